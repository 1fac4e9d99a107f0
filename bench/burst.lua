-- Used by bench/run: wrk -s bench/burst.lua ... (BENCH_LOG_DIR, BENCH_PATH in the environment)
-- Logs every response of a wrk run with its send time and latency, so the
-- burst can be plotted over time. The send time (CLOCK_MONOTONIC, µs) goes
-- into the query string as t=...; bench/app.py echoes it in X-Bench-T, and
-- the response callback subtracts it from the clock. Each wrk thread writes
-- "<send_us> <latency_us> <status>" lines to its own file.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC, the clock Python's time.monotonic() reads
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

local path, log
function init(args)
  path = os.getenv("BENCH_PATH") or "/sleep?ms=20"
  local dir = os.getenv("BENCH_LOG_DIR") or "."
  log = assert(io.open(string.format("%s/wrk-thread-%d.log", dir, id), "w"))
  log:setvbuf("line")
end

local sep
function request()
  sep = sep or (string.find(path, "?", 1, true) and "&" or "?")
  return wrk.format("GET", path .. sep .. "t=" .. now_us())
end

function response(status, headers, body)
  local t = tonumber(headers["X-Bench-T"] or headers["x-bench-t"])
  if t then
    log:write(t, " ", now_us() - t, " ", status, "\n")
  else
    log:write("- - ", status, "\n")
  end
end
