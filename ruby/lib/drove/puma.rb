# SPDX-License-Identifier: MIT OR Apache-2.0
#
# drove-puma: Puma in drove's template mode (docs/template.md, ruby/README.md).
#
#   [worker]
#   mode = "template"
#   command = ["drove-puma", "-e", "production", "-t", "5:5", "config.ru"]
#
# The template (the process droved starts) reads Puma's options and
# config/puma.rb exactly as `puma` would, loads the Rack app once, runs the
# `before_fork` hooks, compacts the heap and says hello; each `spawn` forks
# a worker that runs one Puma::Server (threads as configured) on the
# sockets droved passed. Cluster mode's work (forking, counting, restarting
# workers, phased restarts) is droved's, so the options for it are refused.
require "uri"
require "drove/template"

module Drove
  module Puma
    PROG = "drove-puma"

    USAGE = <<~TEXT
      usage: #{PROG} [puma options] [config.ru]

      Puma in drove's template mode: droved runs this command once per
      configuration generation ([worker] mode = "template" in drove.toml);
      it loads Puma's configuration and the Rack app once, and forks a Puma
      server per worker on the sockets droved passes. The options are
      puma's own (below); those of cluster mode (-w, fork_worker), binds
      (-b, -p: the sockets are droved's [listen] addresses) and the control
      app are refused: droved does that work. See
      /usr/share/doc/drove/README.puma.md.

    TEXT

    # Options of Puma's cluster master that mean nothing here: set in a
    # config file or on the command line they are ignored, with a warning.
    IGNORED = {
      pidfile: "pidfile (each worker is droved's; `drovectl list` shows them)",
      state: "state_path (pumactl has no server to talk to; use drovectl)",
      restart_cmd: "restart_command (`drovectl reload` starts a new template)",
      prune_bundler: "prune_bundler (cluster mode only)",
      extra_runtime_dependencies: "extra_runtime_dependencies (prune_bundler only)",
      worker_timeout: "worker_timeout (droved's [worker] watchdog applies)",
      worker_boot_timeout: "worker_boot_timeout (droved's [worker] ready_timeout applies)",
      worker_shutdown_timeout: "worker_shutdown_timeout (droved's [worker] stop_timeout applies)",
      worker_check_interval: "worker_check_interval (cluster mode only)",
      worker_culling_strategy: "worker_culling_strategy (droved chooses which workers to stop)",
      on_restart: "on_restart hooks (a reload starts a new template instead)",
      before_refork: "on_refork hooks (fork_worker is refused)",
    }.freeze

    module_function

    # Where an option's value came from, for messages: the command line, a
    # config file, or (for workers) WEB_CONCURRENCY.
    def origin(key, user, file, config_files)
      if user.key?(key)
        "the command line"
      elsif file.key?(key)
        config_files.empty? ? "the config file" : config_files.join(", ")
      end
    end

    # The activated socket a bind names, or nil. Keys are Puma::Binder's:
    # [:tcp, host, port] ("[::1]" for IPv6) and [:unix, path].
    def bind_key(bind)
      uri = URI.parse(bind)
      case uri.scheme
      when "tcp", "ssl" then [:tcp, uri.host, uri.port]
      when "unix" then [:unix, "#{uri.host}#{uri.path}".gsub("%20", " ")]
      end
    rescue URI::InvalidURIError
      nil
    end

    # The binds Puma is given: one per activated socket, in fd order, the
    # configured bind that names it where there is one (how ssl:// options
    # reach droved's socket), else a plain tcp:// or unix:// one.
    def binds_for(activated, configured)
      activated.map do |key|
        configured.find { |b| bind_key(b) == key } ||
          (key[0] == :unix ? "unix://#{key[1]}" : "tcp://#{key[1]}:#{key[2]}")
      end
    end

    def describe(key)
      key[0] == :unix ? "unix:#{key[1]}" : "#{key[1]}:#{key[2]}"
    end

    # Checks Puma's options for drove: pure, on plain hashes (the user and
    # file levels of Puma::UserFileDefaultOptions), the environment and the
    # activated sockets. Returns [errors, warnings]; each error names the
    # option, where it came from, and what to do instead.
    def check(user:, file:, env: ENV, config_files: [], activated: [])
      errors = []
      warnings = []
      opt = ->(k) { user.key?(k) ? user[k] : file[k] }

      workers = opt.(:workers)
      if workers.to_i.positive?
        errors << "workers #{workers} (cluster mode, from #{origin(:workers, user, file, config_files)}) " \
                  "cannot work under drove: droved runs the worker processes. Set [pool] min/max in " \
                  "drove.toml and remove -w/--workers or `workers`"
      elsif workers.nil? && env["WEB_CONCURRENCY"].to_i.positive?
        errors << "WEB_CONCURRENCY=#{env["WEB_CONCURRENCY"]} asks Puma for cluster mode, which cannot work " \
                  "under drove: droved runs the worker processes. Unset it and set [pool] min/max in drove.toml"
      end

      if opt.(:fork_worker)
        errors << "fork_worker (-f/--fork-worker, from #{origin(:fork_worker, user, file, config_files)}) " \
                  "cannot work under drove: workers are forked from drove's template already, and " \
                  "`drovectl reload` is the phased restart"
      end

      if opt.(:control_url)
        errors << "the control app (--control-url / activate_control_app #{opt.(:control_url)}, from " \
                  "#{origin(:control_url, user, file, config_files)}) cannot work under drove: every worker " \
                  "would bind it. Use drovectl (status, reload, restart-workers) instead"
      end

      configured = Array(user[:binds]) + Array(file[:binds])
      configured.each do |bind|
        next if activated.include?(bind_key(bind))

        from = Array(user[:binds]).include?(bind) ? "the command line (-b/-p)" : origin(:binds, {}, file, config_files)
        errors << "bind #{bind} (from #{from}) cannot work under drove: the sockets come from droved " \
                  "([listen] addresses in drove.toml; passed here: " \
                  "#{activated.map { |k| describe(k) }.join(", ")}). Remove it, or name one of those " \
                  "sockets (e.g. ssl://host:port?cert=...)"
      end

      IGNORED.each do |key, what|
        from = origin(key, user, file, config_files) or next
        warnings << "#{what}, from #{from}: ignored under drove"
      end
      [errors, warnings]
    end

    # Runs drove-puma with `argv`; returns only in a worker, never: exits.
    def main(argv)
      $stdout.sync = true
      $stderr.sync = true
      if argv.include?("-h") || argv.include?("--help")
        $stdout.print USAGE
        load_puma
        ::Puma::CLI.new(["--help"])
      end
      if argv.include?("-V") || argv.include?("--version")
        load_puma
        puts "#{PROG} (drove template protocol #{Template::VERSION}), puma version #{::Puma::Const::VERSION}"
        exit 0
      end
      if (why = Template.why_not_a_template)
        die(2, "#{why}.\n#{PROG} runs only as drove's template: put it in drove.toml's [worker] " \
               "command with mode = \"template\". Under systemd socket activation or droved's exec " \
               "mode, run `puma --bind-to-activated-sockets only` itself.")
      end
      Adapter.new(argv).run
    end

    def load_puma
      require "puma"
      require "puma/cli"
      require "puma/server"
    rescue LoadError => e
      die(2, "cannot load Puma (#{e.message}): install it (Debian: apt install puma; or gem install puma)")
    end

    def die(code, message)
      message.each_line { |l| $stderr.puts "#{PROG}[#{Process.pid}]: #{l.chomp}" }
      exit code
    end

    def log(message)
      $stderr.puts "#{PROG}[#{Process.pid}]: #{message}"
    end

    # The template: configuration, app, hooks, then the protocol.
    class Adapter
      def initialize(argv)
        @argv = argv.dup
        @listen_env = ENV.to_h.slice("LISTEN_FDS", "LISTEN_FDNAMES")
      end

      def run
        Puma.load_puma
        configure
        load_app
        fork_preparation
        template = Template::Server.new(ENV.fetch("DROVE_TEMPLATE_FD"))
        # Workers inherit this; the template has nothing to drain.
        Signal.trap("TERM") { exit 0 }
        template.hello
        template.serve(
          before_fork: ->(slot) { @conf.run_hooks(:before_worker_fork, index(slot), @events) },
          after_fork: ->(slot) { @conf.run_hooks(:after_worker_fork, index(slot), @events) }
        ) { |slot, generation| Worker.new(self, slot, generation).run }
      end

      attr_reader :conf, :events, :options, :binder, :app, :listen_env

      def index(slot)
        Integer(slot, 10)
      rescue ArgumentError
        slot
      end

      private

      # Puma's own CLI and Launcher: the same options, config files
      # (config/puma.rb, config/puma/<env>.rb, -C), environment variables,
      # --dir and RACK_ENV as `puma`. The Launcher adopts LISTEN_FDS into its
      # Binder (our pid is LISTEN_PID) and starts nothing.
      def configure
        @events = ::Puma::Events.stdio
        cli = ::Puma::CLI.new(@argv, @events)
        launcher = cli.launcher
        @conf = launcher.config
        @options = launcher.options
        @binder = launcher.binder
      rescue OptionParser::ParseError => e
        hint = e.args.any? { |a| a.start_with?("-d", "--daemon") } ? " (daemonize: under drove a worker stays in the foreground; Puma 5 removed it too)" : ""
        Puma.die(2, "#{e.message}#{hint}; see #{PROG} --help")
      rescue SystemExit
        raise
      rescue NameError => e
        where = e.backtrace&.first
        if e.name == :daemonize
          Puma.die(2, "daemonize (#{where}) cannot work under drove: a worker stays in the foreground, " \
                      "droved supervises it. Remove it")
        end
        # Not e.message: it inspects the whole Puma::DSL object.
        Puma.die(2, "cannot load Puma's configuration: #{e.class}: undefined `#{e.name}' at #{where}")
      rescue Exception => e # rubocop:disable Lint/RescueException: a config file may raise anything
        Puma.die(2, "cannot load Puma's configuration: #{e.class}: #{e.message}\n#{e.backtrace&.first}")
      end

      def activated
        @binder.activated_sockets.keys
      end

      def check_options
        errors, warnings = Puma.check(user: @options.user_options, file: @options.file_options,
                                      config_files: @conf.config_files.compact, activated: activated)
        warnings.each { |w| Puma.log("warning: #{w}") }
        plugins = @conf.plugins.instance_variable_get(:@instances).to_a
        unless plugins.empty?
          Puma.log("warning: #{plugins.size} Puma plugin(s) loaded but not started: plugins run in Puma's " \
                   "master, which droved replaces (for tmp_restart: `drovectl reload`)")
        end
        Puma.die(2, errors.join("\n")) unless errors.empty?
      end

      def load_app
        check_options
        unless @conf.app_configured?
          Puma.die(1, "no Rack app: #{File.expand_path(@conf.rackup)} does not exist (give the config.ru as the last argument)")
        end
        t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        begin
          @app = @conf.app
        rescue Exception => e # rubocop:disable Lint/RescueException: the app may raise anything while loading
          $stderr.puts e.full_message(highlight: false)
          Puma.die(1, "cannot load the Rack app #{@conf.rackup}: #{e.class}: #{e.message}")
        end
        @load_ms = ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0) * 1000).round
        check_options # config.ru may carry options (`#\ -p 8080`) too
        binds = Puma.binds_for(activated, Array(@options.user_options[:binds]) + Array(@options.file_options[:binds]))
        @options[:binds] = binds
        # droved runs several of us: tell the app so (before parse, which
        # copies this env for ssl:// listeners).
        @binder.proto_env["rack.multiprocess"] = true
        @binder.parse(binds, @events)
        redirect_io
      end

      # Before the first fork, as Puma's cluster master does with
      # preload_app!: the before_fork hooks, then a GC that moves what the
      # app loaded into the old generation and compacts the heap
      # (nakayoshi_fork), so the workers' own allocations and GC marking
      # touch as few shared pages as possible.
      def fork_preparation
        @conf.run_hooks(:before_fork, nil, @events)
        t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        if @options.user_options.fetch(:nakayoshi_fork, @options.file_options.fetch(:nakayoshi_fork, true)) == false
          how = "no compaction (nakayoshi_fork false)"
        elsif Process.respond_to?(:warmup)
          Process.warmup # Ruby 3.3+: GC, compaction, and more
          how = "Process.warmup"
        else
          4.times { GC.start(full_mark: false) } # promote the app's objects to old
          GC.respond_to?(:compact) ? GC.compact : GC.start # a full GC either way
          how = GC.respond_to?(:compact) ? "GC.compact" : "GC.start"
        end
        gc_ms = ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0) * 1000).round
        threads = Thread.list.size - 1
        if threads.positive?
          Puma.log("warning: the app started #{threads} thread(s) in the template; they do not survive " \
                   "fork: start them in on_worker_boot instead")
        end
        Puma.log("Puma #{::Puma::Const::VERSION}, ruby #{RUBY_VERSION}, #{@options[:environment]}, " \
                 "threads #{@options[:min_threads]}..#{@options[:max_threads]}, app loaded in #{@load_ms} ms, " \
                 "#{how} in #{gc_ms} ms; serving #{@options[:binds].join(", ")}")
      end

      # Puma's stdout_redirect / --redirect-*: once, in the template; the
      # workers inherit the files.
      def redirect_io
        append = @options[:redirect_append] ? "a" : "w"
        { STDOUT => @options[:redirect_stdout], STDERR => @options[:redirect_stderr] }.each do |io, path|
          next unless path

          io.reopen(path, append)
          io.sync = true
        end
      end
    end

    # At a graceful stop Puma (5.6) closes every connection in its reactor
    # for which Client#can_close? holds, and that holds for one it accepted
    # whose request has not arrived yet: the client gets its connection
    # closed instead of an answer (seen in the reload test as one "Broken
    # pipe" in ~6 runs). In a pool the stopping worker has accepted that
    # connection for the pool; only an idle kept-alive connection, which
    # served a request already, may be closed then.
    module AnswerWhatWasAccepted
      def can_close?
        @requests_served.to_i.positive? && super
      end
    end

    # One worker: a Puma::Server on the inherited sockets, as Puma's
    # cluster worker runs it.
    class Worker
      def initialize(adapter, slot, generation)
        @a = adapter
        @slot = slot
        @index = adapter.index(slot)
        @generation = generation
        @stopping = false
      end

      def run
        ENV["LISTEN_FDS"] = @a.listen_env["LISTEN_FDS"]
        ENV["LISTEN_FDNAMES"] = @a.listen_env["LISTEN_FDNAMES"] if @a.listen_env["LISTEN_FDNAMES"]
        title = "puma #{::Puma::Const::VERSION}: drove worker #{@slot} (generation #{@generation})"
        title += " [#{@a.options[:tag]}]" if @a.options[:tag] && !@a.options[:tag].empty?
        Process.setproctitle(title)
        # on_worker_boot: in each worker, before it serves.
        @a.conf.run_hooks(:before_worker_boot, @index, @a.events)
        server = ::Puma::Server.new(@a.app, @a.events, @a.options)
        server.inherit_binder(@a.binder)
        ::Puma::Client.prepend(AnswerWhatWasAccepted) if ::Puma::Client.method_defined?(:can_close?)
        trap_signals(server)
        thread = server.run
        Notify.notify("READY=1") unless @stopping
        @a.events.fire_on_booted!
        start_watchdog(thread)
        begin
          thread.join
        rescue Interrupt
          # a stop signal while joining: the server thread is stopping
        end
        @a.conf.run_hooks(:before_worker_shutdown, @index, @a.events)
        stopping
        exit(@exit_code || 0)
      end

      private

      def stopping
        return if @stopping

        @stopping = true
        Notify.notify("STOPPING=1")
      end

      # SIGTERM: Puma's graceful stop (stop accepting, finish the requests
      # in flight, bounded by force_shutdown_after). SIGINT, SIGQUIT: stop
      # at once. SIGHUP: reopen redirected logs, as Puma does.
      def trap_signals(server)
        Signal.trap("TERM") do
          stopping
          server.stop
        end
        %w[INT QUIT].each do |sig|
          Signal.trap(sig) do
            stopping
            @exit_code = 128 + Signal.list.fetch(sig)
            server.halt
          end
        end
        Signal.trap("HUP") do
          redirect = @a.options[:redirect_stdout] || @a.options[:redirect_stderr]
          @a.send(:redirect_io) if redirect
        end
      end

      def start_watchdog(server_thread)
        interval = Notify.watchdog_interval or return
        Thread.new do
          while server_thread.alive?
            Notify.notify("WATCHDOG=1")
            sleep interval
          end
        end
      end
    end
  end
end
