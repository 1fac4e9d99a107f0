// Node.js server for the compatibility suite (tests/compat), run under droved:
//   node tests/compat/apps/hello.js     (the listening socket is fd 3)
// SPDX-License-Identifier: MIT OR Apache-2.0
//
//   /            pid=<pid>
//   /sleep?ms=N  the same after N ms (a request in flight during a stop)
//
// Node has no socket activation of its own beyond listen({ fd }), and its
// default SIGTERM action kills the process at once: a production server
// closes its listener and lets requests in flight finish, as here.
'use strict';
const http = require('http');

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const ms = url.pathname === '/sleep' ? Number(url.searchParams.get('ms')) || 0 : 0;
  setTimeout(() => {
    res.setHeader('Content-Type', 'text/plain');
    res.end(`pid=${process.pid}\n`);
  }, Math.min(Math.max(ms, 0), 60000));
});
server.listen({ fd: 3 });
process.on('SIGTERM', () => server.close());
