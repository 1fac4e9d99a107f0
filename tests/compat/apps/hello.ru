# Rack app for the compatibility suite (tests/compat): run by Puma under droved.
# SPDX-License-Identifier: MIT OR Apache-2.0
#
#   /            pid=<pid> loaded_by=<pid of the process that loaded this file>
#   /sleep?ms=N  the same after N ms (a request in flight during a stop)
# (loaded_by is the template for a worker forked by drove-puma.)
LOADED_BY = Process.pid
run lambda { |env|
  if env["PATH_INFO"] == "/sleep"
    ms = env["QUERY_STRING"].to_s[/(?:\A|&)ms=(\d+)/, 1].to_i
    sleep(ms.clamp(0, 60_000) / 1000.0)
  end
  [200, { "Content-Type" => "text/plain" }, ["pid=#{Process.pid} loaded_by=#{LOADED_BY}\n"]]
}
