# SPDX-License-Identifier: MIT OR Apache-2.0
"""drove.gunicorn's pure parts: which gunicorn options cannot work under
drove, and how gunicorn's timeout meets drove's watchdog. No gunicorn
needed (the real thing runs in tests/compat)."""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from drove import gunicorn as g  # noqa: E402

DEFAULTS = {
    "workers": 1,
    "bind": ["127.0.0.1:8000"],
    "daemon": False,
    "reload": False,
    "reuse_port": False,
    "dirty_workers": 0,
    "dirty_apps": [],
}


def errors(**values):
    def setting(name):
        return values.get(name, DEFAULTS[name]), DEFAULTS[name]

    return g.incompatible_options(setting)


class Options(unittest.TestCase):
    def test_defaults_are_fine(self):
        self.assertEqual(errors(), [])

    def test_each_bad_option_is_named_with_what_to_do(self):
        table = [
            ({"workers": 4}, ["workers = 4", "-w/--workers", "[pool] min/max"]),
            ({"bind": ["0.0.0.0:80"]}, ["bind = 0.0.0.0:80", "-b/--bind", "[listen]"]),
            ({"daemon": True}, ["-D/--daemon"]),
            ({"reload": True}, ["--reload", "drovectl reload"]),
            ({"reuse_port": True}, ["--reuse-port"]),
            ({"dirty_workers": 2, "dirty_apps": ["x:y"]}, ["--dirty-workers"]),
        ]
        for values, needles in table:
            got = errors(**values)
            self.assertEqual(len(got), 1, (values, got))
            for needle in needles:
                self.assertIn(needle, got[0], values)

    def test_all_at_once(self):
        got = errors(workers=2, daemon=True, reload=True, bind=["unix:/x"])
        self.assertEqual(len(got), 4, got)

    def test_one_worker_is_fine(self):
        self.assertEqual(errors(workers=1), [])


class Timeout(unittest.TestCase):
    def test_watchdog_wins_and_the_worker_heartbeats_at_half(self):
        self.assertEqual(g.worker_timeout(30, False, 10.0), (5.0, None, None))

    def test_an_explicit_gunicorn_timeout_that_differs_is_noted(self):
        half, announce, note = g.worker_timeout(60, True, 10.0)
        self.assertEqual((half, announce), (5.0, None))
        self.assertIn("replaced by drove's watchdog (10 s", note)

    def test_the_same_timeout_needs_no_note(self):
        self.assertEqual(g.worker_timeout(10, True, 10.0), (5.0, None, None))

    def test_without_a_watchdog_gunicorns_timeout_becomes_it(self):
        # The worker announces it to droved (WATCHDOG_USEC=30000000).
        self.assertEqual(g.worker_timeout(30, False, None), (15.0, 30.0, None))

    def test_gunicorns_timeout_0_means_no_watchdog(self):
        self.assertEqual(g.worker_timeout(0, True, None), (0, None, None))

if __name__ == "__main__":
    unittest.main()
