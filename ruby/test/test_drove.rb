# SPDX-License-Identifier: MIT OR Apache-2.0
#
# Unit tests for ruby/lib/drove: protocol messages, the template's start
# checks and its fork loop, Puma option checks and binds.
#   ruby ruby/test/test_drove.rb      (tests/run runs it)
$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "minitest/autorun"
require "drove/puma"

class TestTemplateMessages < Minitest::Test
  T = Drove::Template

  def test_spawn_parses_slot_and_generation
    assert_equal [:spawn, "3", "7"], T.parse("spawn 3 7")
    assert_equal [:spawn, "0", "12"], T.parse("spawn 0 12\n")
  end

  def test_end_of_file_is_eof
    assert_equal [:eof], T.parse("")
    assert_equal [:eof], T.parse(nil)
  end

  def test_an_unknown_word_is_reported_not_an_error
    assert_equal [:unknown, "ping"], T.parse("ping 1")
  end

  def test_a_malformed_spawn_is_a_protocol_error
    ["spawn", "spawn 1", "spawn 1 2 3", "spawn a 1", "spawn  1 2", "spawn -1 2"].each do |msg|
      assert_raises(T::ProtocolError, msg) { T.parse(msg) }
    end
  end

  def test_oversized_or_non_ascii_messages_are_protocol_errors
    assert_raises(T::ProtocolError) { T.parse("spawn 1 " + "1" * 600) }
    assert_raises(T::ProtocolError) { T.parse("spawn 1 \u00e9") }
  end

  def test_answers
    assert_equal "pid 42", T.pid_answer(42)
    assert_equal "pid 42", T.pid_answer("42")
    assert_raises(ArgumentError) { T.pid_answer("") }
    assert_equal "error fork: Resource temporarily unavailable", T.error_answer("fork: Resource\ntemporarily unavailable")
    assert_equal "error fork failed", T.error_answer("")
    assert_equal "error caf? x", T.error_answer("caf\u00e9\tx")
    assert_equal T::MAX_MESSAGE, T.error_answer("x " * 400).bytesize
  end

  def test_why_not_a_template
    ok = { "DROVE_TEMPLATE_FD" => "4", "LISTEN_FDS" => "1", "LISTEN_PID" => "99" }
    assert_nil T.why_not_a_template(ok, 99)
    assert_match(/DROVE_TEMPLATE_FD is not set/, T.why_not_a_template(ok.merge("DROVE_TEMPLATE_FD" => nil), 99))
    assert_match(/not a file descriptor/, T.why_not_a_template(ok.merge("DROVE_TEMPLATE_FD" => "x"), 99))
    assert_match(/LISTEN_FDS is not set/, T.why_not_a_template(ok.reject { |k, _| k == "LISTEN_FDS" }, 99))
    assert_match(/expected at least 1/, T.why_not_a_template(ok.merge("LISTEN_FDS" => "0"), 99))
    assert_match(/not for me/, T.why_not_a_template(ok, 100))
  end
end

# The template loop in a forked child, this process as droved (a
# subreaper, so the workers become its children as they would droved's).
class TestTemplateLoop < Minitest::Test
  PR_SET_CHILD_SUBREAPER = 36

  def test_many_asks_at_once_are_answered_in_order_each_a_child_of_droved
    prctl = Drove::Template.prctl
    refute_nil prctl, "prctl through Fiddle (Debian's libruby has it)"
    assert_equal 0, prctl.call(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    ours, theirs = UNIXSocket.pair(:SEQPACKET)
    report_r, report_w = IO.pipe
    template = fork do
      ours.close
      report_r.close
      server = Drove::Template::Server.new(theirs.fileno, log: File.open(File::NULL, "w"))
      server.hello
      server.serve do |slot, _generation|
        report_w.write("#{Process.pid} #{slot}\n")
        report_w.flush
        sleep 30
      end
    end
    theirs.close
    report_w.close
    assert_equal "DROVE-TEMPLATE 1", ours.recv(512)
    asks = 3 * Drove::Template::FORK_PIPELINE
    asks.times { |slot| ours.send("spawn #{slot} 1", 0) }
    answered = Array.new(asks) do
      answer = ours.recv(512)
      assert_match(/\Apid [0-9]+\z/, answer)
      pid = Integer(answer.split[1])
      ppid = Integer(File.read("/proc/#{pid}/stat").rpartition(")").last.split[1])
      assert_equal Process.pid, ppid, "droved's child when named"
      pid
    end
    reports = +""
    reports << report_r.readpartial(4096) while reports.count("\n") < asks
    slot_of = reports.lines.to_h { |l| l.split.map(&:to_s) }
    assert_equal (0...asks).map(&:to_s), answered.map { |pid| slot_of[pid.to_s] }
    answered.each do |pid|
      Process.kill(:KILL, pid)
      Process.wait(pid)
    end
    ours.close
    Process.wait(template)
    assert_equal 0, $?.exitstatus
  end
end

class TestNotify < Minitest::Test
  N = Drove::Notify

  def test_address
    assert_equal "/run/x", N.address("/run/x")
    assert_equal "\0abc", N.address("@abc")
    assert_nil N.address("")
    assert_nil N.address(nil)
    assert_nil N.address("vsock:1:2")
  end

  def test_watchdog_interval
    assert_equal 1.5, N.watchdog_interval({ "WATCHDOG_USEC" => "3000000" }, 5)
    assert_equal 1.5, N.watchdog_interval({ "WATCHDOG_USEC" => "3000000", "WATCHDOG_PID" => "5" }, 5)
    assert_nil N.watchdog_interval({ "WATCHDOG_USEC" => "3000000", "WATCHDOG_PID" => "6" }, 5)
    assert_nil N.watchdog_interval({}, 5)
    assert_nil N.watchdog_interval({ "WATCHDOG_USEC" => "0" }, 5)
    assert_nil N.watchdog_interval({ "WATCHDOG_USEC" => "soon" }, 5)
  end
end

class TestPumaOptions < Minitest::Test
  P = Drove::Puma
  TCP = [:tcp, "127.0.0.1", 8080].freeze
  UNIX = [:unix, "/run/app.sock"].freeze

  def check(user: {}, file: {}, env: {}, activated: [TCP])
    P.check(user: user, file: file, env: env, config_files: ["config/puma.rb"], activated: activated)
  end

  def test_plain_options_pass
    errors, warnings = check(user: { min_threads: 2, max_threads: 5, environment: "production" })
    assert_empty errors
    assert_empty warnings
  end

  def test_cluster_workers_are_refused_naming_where_they_came_from
    errors, = check(user: { workers: 2 })
    assert_equal 1, errors.size
    assert_match(/\Aworkers 2 \(cluster mode, from the command line\) cannot work under drove/, errors[0])
    errors, = check(file: { workers: 4 })
    assert_match(/from config\/puma\.rb/, errors[0])
    errors, = check(env: { "WEB_CONCURRENCY" => "3" })
    assert_match(/\AWEB_CONCURRENCY=3 asks Puma for cluster mode/, errors[0])
    # `workers 0` in a file wins over the environment, as in Puma.
    assert_empty check(file: { workers: 0 }, env: { "WEB_CONCURRENCY" => "3" })[0]
  end

  def test_fork_worker_and_control_app_are_refused
    errors, = check(file: { fork_worker: 1000, control_url: "unix:///tmp/ctl" })
    assert_equal 2, errors.size
    assert_match(/\Afork_worker .*from config\/puma\.rb/, errors[0])
    assert_match(/control app .*unix:\/\/\/tmp\/ctl/, errors[1])
  end

  def test_binds_must_name_an_activated_socket
    errors, = check(user: { binds: ["tcp://0.0.0.0:3000"] })
    assert_equal 1, errors.size
    assert_match(/\Abind tcp:\/\/0\.0\.0\.0:3000 \(from the command line \(-b\/-p\)\)/, errors[0])
    assert_match(/passed here: 127\.0\.0\.1:8080/, errors[0])
    errors, = check(file: { binds: ["tcp://127.0.0.1:8080", "unix:///run/other.sock"] }, activated: [TCP, UNIX])
    assert_equal 1, errors.size
    assert_match(/unix:\/\/\/run\/other\.sock \(from config\/puma\.rb\)/, errors[0])
    assert_empty check(file: { binds: ["ssl://127.0.0.1:8080?cert=a&key=b"] })[0]
  end

  def test_cluster_only_options_are_ignored_with_a_warning
    errors, warnings = check(file: { pidfile: "tmp/pids/server.pid", worker_timeout: 30 })
    assert_empty errors
    assert_equal 2, warnings.size
    assert_match(/\Apidfile .*from config\/puma\.rb: ignored under drove/, warnings[0])
    assert_match(/\Aworker_timeout/, warnings[1])
  end

  def test_binds_follow_the_activated_sockets_keeping_configured_options
    assert_equal ["tcp://127.0.0.1:8080", "unix:///run/app.sock"], P.binds_for([TCP, UNIX], [])
    ssl = "ssl://127.0.0.1:8080?cert=c.pem&key=k.pem"
    assert_equal [ssl, "unix:///run/app.sock"], P.binds_for([TCP, UNIX], [ssl])
    assert_equal ["tcp://[::1]:80"], P.binds_for([[:tcp, "[::1]", 80]], ["tcp://[::1]:80"])
  end

  def test_bind_key
    assert_equal [:tcp, "127.0.0.1", 80], P.bind_key("tcp://127.0.0.1:80")
    assert_equal [:tcp, "[::1]", 80], P.bind_key("ssl://[::1]:80?key=x")
    assert_equal [:unix, "/run/a b.sock"], P.bind_key("unix:///run/a%20b.sock")
    assert_nil P.bind_key("http://x")
    assert_nil P.bind_key("::nonsense::")
  end
end
