# SPDX-License-Identifier: MIT OR Apache-2.0
#
# drove's template protocol, version 1 (docs/template.md), for Ruby servers:
# the template says hello on DROVE_TEMPLATE_FD, then forks one worker per
# `spawn <slot> <generation>` (a double fork, so the worker becomes droved's
# child) and answers `pid <n>` or `error <text>`. Stdlib only; the Puma
# adapter (drove/puma.rb) is built on it, and so can other Rack servers be.
#
# examples/template_worker.rb keeps its own 30-line copy on purpose: it is
# the standalone, one-file demo of the protocol.
require "socket"

module Drove
  # sd_notify(3) from a worker: READY=1, WATCHDOG=1, STOPPING=1.
  module Notify
    # The NOTIFY_SOCKET address as Socket.sockaddr_un wants it, or nil.
    def self.address(value = ENV["NOTIFY_SOCKET"])
      return nil if value.nil? || value.empty?
      return "\0" + value[1..] if value.start_with?("@") # abstract namespace
      return value if value.start_with?("/")

      nil
    end

    # A socket per message: no lock, so a signal handler may notify too
    # (Ruby forbids Mutex#synchronize in trap context).
    def self.notify(message)
      addr = address or return false
      Socket.open(:UNIX, :DGRAM) { |s| s.send(message, 0, Socket.sockaddr_un(addr)) }
      true
    rescue SystemCallError, IOError => e
      warn "drove: sending #{message.inspect} to NOTIFY_SOCKET: #{e.message}"
      false
    end

    # The watchdog interval in seconds (half of WATCHDOG_USEC), or nil when
    # no watchdog is asked of this process.
    def self.watchdog_interval(env = ENV, pid = Process.pid)
      usec = env["WATCHDOG_USEC"].to_s.strip
      return nil if usec.empty?
      wd_pid = env["WATCHDOG_PID"].to_s.strip
      return nil if !wd_pid.empty? && wd_pid != pid.to_s

      n = Integer(usec, 10)
      n.positive? ? n / 2e6 : nil
    rescue ArgumentError
      nil
    end
  end

  module Template
    VERSION = 1
    MAX_MESSAGE = 512 # bytes, the protocol's limit for one datagram
    PR_SET_PDEATHSIG = 1
    # How long a new worker waits to be reparented to droved (the
    # intermediate exits at once; longer means droved is gone).
    REPARENT_TIMEOUT = 2.0
    # Forks a template starts before it answers the oldest.
    FORK_PIPELINE = 4

    class ProtocolError < StandardError; end

    # One datagram from droved: [:spawn, slot, generation], [:eof] (droved
    # closed the socket), or [:unknown, word] for a message this version
    # does not know (ignored, for a later protocol). A `spawn` without its
    # two words is a ProtocolError (droved never sends one).
    def self.parse(datagram)
      return [:eof] if datagram.nil? || datagram.empty?
      raise ProtocolError, "message longer than #{MAX_MESSAGE} bytes" if datagram.bytesize > MAX_MESSAGE

      text = datagram.b.chomp("\n")
      raise ProtocolError, "not ASCII: #{text.inspect}" unless text.ascii_only?

      word, *args = text.split(/ /, -1) # single spaces, as the protocol says
      return [:unknown, word.to_s] unless word == "spawn"
      unless args.length == 2 && args.all? { |a| a.match?(/\A[0-9]+\z/) }
        raise ProtocolError, "bad spawn message #{text.inspect}"
      end

      [:spawn, args[0], args[1]]
    end

    # `pid <n>`, the answer for a forked worker.
    def self.pid_answer(pid)
      "pid #{Integer(pid)}"
    end

    # `error <text>`, printable ASCII words, within the protocol's limit.
    def self.error_answer(text)
      words = text.to_s.encode("ASCII", invalid: :replace, undef: :replace, replace: "?")
                  .gsub(/[^[:print:]]/, " ").split
      words = ["fork", "failed"] if words.empty?
      "error #{words.join(" ")}"[0, MAX_MESSAGE]
    end

    # A process started by droved in template mode: DROVE_TEMPLATE_FD set,
    # and the listeners ours (LISTEN_PID is our pid). Returns nil when so,
    # else why not (for a message before exit 2).
    def self.why_not_a_template(env = ENV, pid = Process.pid)
      fd = env["DROVE_TEMPLATE_FD"].to_s
      return "DROVE_TEMPLATE_FD is not set" if fd.empty?
      return "DROVE_TEMPLATE_FD=#{fd.inspect} is not a file descriptor" unless fd.match?(/\A[0-9]+\z/)
      return "LISTEN_FDS is not set: no listening sockets were passed" if env["LISTEN_FDS"].to_s.empty?
      return "LISTEN_FDS=#{env["LISTEN_FDS"].inspect}: expected at least 1" unless env["LISTEN_FDS"].to_i >= 1
      if env["LISTEN_PID"].to_s != pid.to_s
        return "LISTEN_PID=#{env["LISTEN_PID"].inspect} but my pid is #{pid}: these sockets are not for me"
      end

      nil
    end

    # The template's side of the protocol. `serve` returns only in a forked
    # worker (with its slot and generation); the template itself exits 0
    # when droved closes the socket.
    class Server
      def initialize(fd, log: $stderr)
        @socket = Socket.for_fd(Integer(fd))
        @socket.autoclose = true
        @socket.close_on_exec = true # the app's children get none of it
        @droved = Process.ppid
        @log = log
        Template.prctl
      end

      attr_reader :droved

      def hello
        @socket.send("DROVE-TEMPLATE #{VERSION}", 0)
      end

      # Each `spawn` answered in order. A scale-up asks for many workers at
      # once: the template forks up to FORK_PIPELINE ahead of its answers,
      # so the next fork overlaps the last intermediate's fork and exit.
      # `before_fork` and `after_fork` are called in the template with the
      # slot around each fork; `worker` runs in the new worker (after
      # Template.become_worker) and must not return: when it does, the
      # worker exits 0.
      def serve(before_fork: nil, after_fork: nil, &worker)
        owed = [] # [:fork, intermediate pid, pipe] or [:error, answer], oldest first
        loop do
          if owed.empty?
            data = @socket.recv(MAX_MESSAGE + 1)
          else
            begin
              data = @socket.recv_nonblock(MAX_MESSAGE + 1)
            rescue IO::WaitReadable
              settle(owed.shift)
              next
            end
            settle(owed.shift) if owed.length >= FORK_PIPELINE
          end
          kind, slot, generation = Template.parse(data)
          case kind
          when :eof # droved is done with this template
            settle(owed.shift) until owed.empty?
            exit 0
          when :unknown then @log.puts "drove: ignoring template message #{slot.inspect}"
          when :spawn
            before_fork&.call(slot)
            owed << start_fork(slot, generation, owed, &worker)
            after_fork&.call(slot)
          end
        rescue ProtocolError => e
          # droved sends nothing like it: answer, so the order holds.
          @log.puts "drove: #{e.message}"
          owed << [:error, Template.error_answer(e.message)]
        end
      end

      private

      # The double fork of docs/template.md: the intermediate forks the
      # worker, writes its answer to a pipe and leaves. Returns what is
      # owed for it.
      def start_fork(slot, generation, owed, &worker)
        $stdout.flush
        $stderr.flush
        r, w = IO.pipe
        middle = fork do
          r.close
          begin
            pid = fork do
              w.close
              owed.each { |kind, _, pipe| pipe.close if kind == :fork && !pipe.closed? }
              @socket.close
              Template.become_worker(@droved, slot, generation)
              worker.call(slot, generation)
            end
            w.write(Template.pid_answer(pid))
          rescue SystemCallError => e
            w.write(Template.error_answer("fork: #{e.message}"))
          end
          exit!(0)
        end
        w.close
        [:fork, middle, r]
      rescue SystemCallError => e
        r&.close unless r&.closed?
        [:error, Template.error_answer("fork: #{e.message}")]
      ensure
        w&.close unless w&.closed?
      end

      # Sends what is owed for the oldest ask: for a fork, once its
      # intermediate is reaped (the worker is droved's child from then on).
      def settle(owed)
        kind, what, pipe = owed
        answer = what
        if kind == :fork
          Process.wait(what)
          answer = pipe.read
          pipe.close
          answer = Template.error_answer("fork failed") if answer.empty?
        end
        @socket.send(answer, 0)
      rescue SystemCallError, IOError
        nil # droved is gone: the end of file that follows ends us
      end
    end

    # Steps 2-4 of "In the worker": wait to be droved's child, die with
    # droved, take the worker's environment, reseed.
    def self.become_worker(droved, slot, generation, env: ENV)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + REPARENT_TIMEOUT
      until Process.ppid == droved
        exit!(1) if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline # droved is gone
        sleep 0.001
      end
      watch_parent(droved) unless set_pdeathsig(Signal.list.fetch("TERM"))
      exit!(1) unless Process.ppid == droved # droved died before the prctl
      env["LISTEN_PID"] = Process.pid.to_s
      env["DROVE_WORKER"] = slot
      env["DROVE_GENERATION"] = generation
      env.delete("DROVE_TEMPLATE_FD")
      Random.srand # a fork shares the template's seed
    end

    # prctl(2) through Fiddle (Ruby's libffi binding, in Debian's libruby),
    # or nil. Looked up by the template before it forks (Server.new), so
    # the workers share Fiddle instead of each loading it.
    def self.prctl
      return @prctl if defined?(@prctl)

      @prctl = begin
        require "fiddle"
        Fiddle::Function.new(Fiddle.dlopen(nil)["prctl"], [Fiddle::TYPE_INT] + [Fiddle::TYPE_LONG] * 4,
                             Fiddle::TYPE_INT)
      rescue LoadError, StandardError
        nil
      end
    end

    # PR_SET_PDEATHSIG: fork cleared the template's. False when Fiddle or
    # prctl is not there.
    def self.set_pdeathsig(signo)
      fn = prctl or return false
      fn.call(PR_SET_PDEATHSIG, signo, 0, 0, 0).zero?
    rescue StandardError
      false
    end

    # Without prctl: a thread (a worker may run threads) that notices within
    # half a second that droved is gone and stops the worker as droved's
    # death would have.
    def self.watch_parent(droved)
      Thread.new do
        sleep 0.5 while Process.ppid == droved
        Process.kill("TERM", Process.pid)
      end
    end
  end
end
