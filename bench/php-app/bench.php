<?php
// bench/php's script, the same for every contender: 20 ms of "I/O"
// (usleep), then the pid that answered. X-Bench-T echoes wrk's t= (send
// time) so bench/burst.lua can log each request's latency.
usleep(20000);
if (isset($_GET['t'])) {
    header('X-Bench-T: ' . (int)$_GET['t']);
}
echo "pid=", getmypid(), "\n";
