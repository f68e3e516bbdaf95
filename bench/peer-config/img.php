<?php
// The seed paper's blue-ball script: the query string is the worker's IPv4
// address as the survey page saw it; log it with the address that fetched
// the ball, then return the image.
file_put_contents(
    __DIR__ . '/../img.log',
    sprintf("%.6f %s %s\n", microtime(true), $_SERVER['REMOTE_ADDR'], $_SERVER['QUERY_STRING']),
    FILE_APPEND | LOCK_EX
);
header('Content-Type: image/png');
header('Cache-Control: no-store');
readfile(__DIR__ . '/blue.png');
