# Run: droved --mode template -l 127.0.0.1:8080 -w 4 -- ruby examples/template_worker.rb
# SPDX-License-Identifier: MIT OR Apache-2.0
#
# The template protocol (docs/template.md) in Ruby, stdlib only, to show it
# is not Python's: a tiny HTTP worker that answers
# "pid=.. loaded_by=.. ppid=.. worker=.. generation=..". Without
# DROVE_TEMPLATE_FD it is an ordinary (exec mode) worker. It stays one
# standalone file on purpose; the library for real servers (message checks,
# error answers, PDEATHSIG without Fiddle) is ruby/lib/drove/template.rb,
# which drove-puma uses.
require "socket"
require "fiddle"

LOADED_BY = Process.pid # "the app is loaded": forks inherit this
abort "LISTEN_PID is not mine" unless ENV["LISTEN_PID"] == Process.pid.to_s
LISTENER = Socket.for_fd(3)

def notify(msg)
  addr = ENV["NOTIFY_SOCKET"] or return
  addr = "\0" + addr[1..] if addr.start_with?("@")
  Socket.open(:UNIX, :DGRAM) { |s| s.send(msg, 0, Socket.sockaddr_un(addr)) }
end

def serve
  stop = false
  Signal.trap("TERM") { stop = true }
  notify("READY=1")
  until stop
    next unless IO.select([LISTENER], nil, nil, 0.2)
    conn, = LISTENER.accept_nonblock(exception: false)
    next unless conn.is_a?(Socket)
    nil until (line = conn.gets).nil? || line.strip.empty?
    body = "pid=#{Process.pid} loaded_by=#{LOADED_BY} ppid=#{Process.ppid} " \
           "worker=#{ENV["DROVE_WORKER"]} generation=#{ENV["DROVE_GENERATION"]}\n"
    conn.write("HTTP/1.1 200 OK\r\nContent-Length: #{body.bytesize}\r\n" \
               "Connection: close\r\n\r\n#{body}")
    conn.close
  end
  notify("STOPPING=1")
  exit 0
end

serve unless (fd = ENV["DROVE_TEMPLATE_FD"])

# The template: hello, then one `spawn <slot> <generation>` at a time.
droved = Process.ppid
tpl = Socket.for_fd(Integer(fd))
tpl.send("DROVE-TEMPLATE 1", 0)
prctl = Fiddle::Function.new(Fiddle.dlopen(nil)["prctl"], [Fiddle::TYPE_INT] * 5, Fiddle::TYPE_INT)
loop do
  word, slot, generation = tpl.recv(512).split
  exit 0 if word.nil? # droved closed the socket
  next unless word == "spawn"
  r, w = IO.pipe
  middle = fork do
    worker = fork do # becomes droved's child once `middle` exits
      [r, w, tpl].each(&:close)
      deadline = Time.now + 2
      sleep 0.001 until Process.ppid == droved || Time.now > deadline
      prctl.call(1, 15, 0, 0, 0) # PR_SET_PDEATHSIG, SIGTERM: fork cleared it
      exit!(1) unless Process.ppid == droved
      ENV.update("LISTEN_PID" => Process.pid.to_s, "DROVE_WORKER" => slot,
                 "DROVE_GENERATION" => generation)
      ENV.delete("DROVE_TEMPLATE_FD")
      serve
    end
    w.write(worker.to_s)
    exit!(0)
  end
  w.close
  Process.wait(middle)
  pid = r.read
  r.close
  tpl.send(pid.empty? ? "error fork failed" : "pid #{pid}", 0)
end
