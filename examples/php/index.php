<?php
// drove's PHP example (tests/suite/php.rs, bench/php): sleeps ?ms=N
// milliseconds, then says which php-cgi process answered.
$ms = (int)($_GET['ms'] ?? 0);
if ($ms > 0) {
    usleep($ms * 1000);
}
echo "pid=", getmypid(), "\n";
