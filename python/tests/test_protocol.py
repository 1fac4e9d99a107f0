# SPDX-License-Identifier: MIT OR Apache-2.0
"""drove._protocol: the pure parsers, and the template loop against a
real socketpair with this process as droved (a child subreaper)."""

import ctypes
import os
import signal
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from drove import _protocol as p  # noqa: E402


class ParseListenFds(unittest.TestCase):
    def test_ours(self):
        env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}
        self.assertEqual(p.parse_listen_fds(env, 42), [(3, "web"), (4, "admin")])

    def test_missing_names_are_unknown(self):
        env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"}
        self.assertEqual(p.parse_listen_fds(env, 42), [(3, "web"), (4, "unknown")])

    def test_each_broken_contract_says_what(self):
        cases = [
            ({}, "LISTEN_PID is not set"),
            ({"LISTEN_PID": "7", "LISTEN_FDS": "1"}, "LISTEN_PID=7 but my pid is 42"),
            ({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, "LISTEN_FDS='0'"),
            ({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, "LISTEN_FDS='x'"),
            ({"LISTEN_PID": "42"}, "LISTEN_FDS=''"),
        ]
        for env, needle in cases:
            with self.assertRaises(p.ContractError, msg=env) as cm:
                p.parse_listen_fds(env, 42)
            self.assertIn(needle, str(cm.exception))


class ParseOthers(unittest.TestCase):
    def test_template_fd(self):
        self.assertIsNone(p.parse_template_fd({}))
        self.assertEqual(p.parse_template_fd({"DROVE_TEMPLATE_FD": "4"}), 4)
        for bad in ("four", "1", "-3"):
            with self.assertRaises(p.ContractError, msg=bad):
                p.parse_template_fd({"DROVE_TEMPLATE_FD": bad})

    def test_messages(self):
        table = [
            (b"", ("eof",)),
            (b"spawn 3 7", ("spawn", "3", "7")),
            (b"spawn 3 7\n", ("spawn", "3", "7")),
            (b"spawn 3", ("unknown", "spawn 3")),
            (b"spawn  3 7", ("unknown", "spawn  3 7")),
            (b"spawn a 7", ("unknown", "spawn a 7")),
            (b"hello", ("unknown", "hello")),
        ]
        for data, want in table:
            self.assertEqual(p.parse_message(data), want, data)

    def test_notify_socket(self):
        self.assertEqual(p.parse_notify_socket("/run/x"), "/run/x")
        self.assertEqual(p.parse_notify_socket("@abs"), "\0abs")
        self.assertIsNone(p.parse_notify_socket(""))
        self.assertIsNone(p.parse_notify_socket("relative/path"))

    def test_watchdog(self):
        self.assertIsNone(p.parse_watchdog_usec({}, 1))
        self.assertIsNone(p.parse_watchdog_usec({"WATCHDOG_USEC": "0"}, 1))
        self.assertEqual(p.parse_watchdog_usec({"WATCHDOG_USEC": "3000000"}, 1), 3.0)
        env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "2"}
        self.assertIsNone(p.parse_watchdog_usec(env, 1), "another process's")
        with self.assertRaises(p.ContractError):
            p.parse_watchdog_usec({"WATCHDOG_USEC": "soon"}, 1)

    def test_heartbeat_rate_limit(self):
        hb = p.Heartbeat(1.0)
        sent = [t for t in (0.0, 0.1, 0.9, 1.0, 1.5, 2.2, 2.3) if hb.due(t)]
        self.assertEqual(sent, [0.0, 1.0, 2.2])


PR_SET_CHILD_SUBREAPER = 36


class TemplateLoop(unittest.TestCase):
    """serve_template in a forked child, this process as droved."""

    def test_spawn_answers_pid_of_a_child_of_droved_then_eof_exits(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self.assertEqual(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), 0)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        report_r, report_w = os.pipe()
        template = os.fork()
        if template == 0:  # the template
            try:
                ours.close()
                os.close(report_r)
                spawn = p.serve_template(theirs.detach(), lambda m: None, freeze=False)
                # Here only in the worker.
                line = "{} {} {} {} {}".format(
                    os.getpid(),
                    os.getppid(),
                    os.environ["DROVE_WORKER"],
                    os.environ["DROVE_GENERATION"],
                    "DROVE_TEMPLATE_FD" in os.environ,
                )
                os.write(report_w, f"{line} {spawn.number}\n".encode())
            finally:
                os._exit(0)
        theirs.close()
        os.close(report_w)
        os.environ.pop("DROVE_TEMPLATE_FD", None)
        ours.settimeout(10)
        self.assertEqual(ours.recv(512), b"DROVE-TEMPLATE 1")
        ours.send(b"spawn 2 5")
        answer = ours.recv(512).decode()
        self.assertTrue(answer.startswith("pid "), answer)
        worker = int(answer.split()[1])
        report = os.read(report_r, 200).decode().split()
        self.assertEqual(
            report, [str(worker), str(os.getpid()), "2", "5", "False", "1"]
        )
        # Our own child now: we reap it.
        self.assertEqual(os.waitpid(worker, 0)[0], worker)
        ours.close()  # end of file: the template exits 0
        _, status = os.waitpid(template, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        os.close(report_r)

    def test_many_asks_at_once_are_answered_in_order_each_a_child_of_droved(self):
        """A scale-up asks for many workers at once: the template forks
        ahead of its answers (FORK_PIPELINE), yet answers each ask in
        order, with a pid that is droved's child by the time it answers."""
        libc = ctypes.CDLL(None, use_errno=True)
        self.assertEqual(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), 0)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        report_r, report_w = os.pipe()
        template = os.fork()
        if template == 0:
            try:
                ours.close()
                os.close(report_r)
                p.serve_template(theirs.detach(), lambda m: None, freeze=False)
                # Only in a worker: say who we are, then wait to be reaped.
                os.write(report_w, f"{os.getpid()} {os.environ['DROVE_WORKER']}\n".encode())
                time.sleep(30)
            finally:
                os._exit(0)
        theirs.close()
        os.close(report_w)
        ours.settimeout(10)
        self.assertEqual(ours.recv(512), b"DROVE-TEMPLATE 1")
        asks = 3 * p.FORK_PIPELINE
        for slot in range(asks):
            ours.send(f"spawn {slot} 1".encode())
        answered = []
        for _ in range(asks):
            answer = ours.recv(512).decode()
            self.assertTrue(answer.startswith("pid "), answer)
            pid = int(answer.split()[1])
            # droved's child when named (the intermediate was reaped).
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            self.assertEqual(ppid, os.getpid())
            answered.append(pid)
        reports = b""
        while reports.count(b"\n") < asks:
            reports += os.read(report_r, 4096)
        slot_of = dict(line.split() for line in reports.decode().split("\n") if line)
        # The nth answer is the worker of the nth ask.
        self.assertEqual([slot_of[str(pid)] for pid in answered], [str(s) for s in range(asks)])
        for pid in answered:
            os.kill(pid, signal.SIGKILL)
            self.assertEqual(os.waitpid(pid, 0)[0], pid)
        ours.close()
        _, status = os.waitpid(template, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        os.close(report_r)


if __name__ == "__main__":
    unittest.main()
