# SPDX-License-Identifier: MIT OR Apache-2.0
# bench/puma: a Rack app with some weight loaded at boot (stdlib libraries
# and ~40 MB of objects, as an app's code, caches and tables would be),
# for drove-puma against `puma -w 16 --preload`.
require "json"
require "set"
require "erb"
require "uri"
require "net/http"
require "openssl"
require "bigdecimal"
require "csv"
require "yaml"
TABLE = Array.new(200_000) { |i| ["key-#{i}", { id: i, name: "name #{i}" * 2, tags: %w[a b c] }] }.to_h
STRINGS = Array.new(100_000) { |i| "value #{i} " * 4 }
run lambda { |env|
  if env["PATH_INFO"] == "/sleep"
    sleep(env["QUERY_STRING"].to_s[/ms=(\d+)/, 1].to_i / 1000.0)
  end
  body = JSON.generate(pid: Process.pid, entry: TABLE["key-#{rand(200_000)}"])
  headers = { "Content-Type" => "application/json" }
  # bench/burst.lua's send time, echoed (bench/servers.py's bursts)
  tag = env["QUERY_STRING"].to_s[/(?:^|&)t=(\d+)/, 1]
  headers["X-Bench-T"] = tag if tag
  [200, headers, [body]]
}
