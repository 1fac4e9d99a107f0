// Run: cc -O2 -o orphans bench/orphans.c && ./orphans RATE COUNT_FILE   (bench/reap.py builds and runs it)
// SPDX-License-Identifier: MIT OR Apache-2.0
//
// A droved worker for bench/reap.py that makes RATE orphans a second at an
// even pace: a double fork whose grandchild exits at once after its parent,
// so it is reparented to PID 1 (droved) to be reaped. Every 200 ms it writes
// how many it made so far to COUNT_FILE (via COUNT_FILE.tmp and rename).
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s RATE COUNT_FILE\n", argv[0]);
        return 2;
    }
    double rate = atof(argv[1]);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[2]);
    long n = 0;
    double start = now(), last = 0;
    for (;;) {
        if (rate > 0) {
            double wait = start + n / rate - now();
            if (wait > 0) {
                struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                nanosleep(&ts, NULL);
            }
            pid_t middle = fork();
            if (middle == 0) {
                if (fork() == 0)
                    _exit(0); // the orphan
                _exit(0);
            }
            if (middle > 0) {
                waitpid(middle, NULL, 0);
                n++;
            }
        } else {
            usleep(200000);
        }
        double t = now();
        if (t - last >= 0.2) {
            FILE *f = fopen(tmp, "w");
            if (f) {
                fprintf(f, "%ld", n);
                fclose(f);
                rename(tmp, argv[2]);
            }
            last = t;
        }
    }
}
