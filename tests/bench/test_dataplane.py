"""Unit tests for the benchmark's parsers and verdicts (no root, no network).

    python3 -m unittest discover -s tests/bench
"""

import importlib.machinery
import importlib.util
import sys
import unittest
from pathlib import Path

_loader = importlib.machinery.SourceFileLoader("dataplane", str(Path(__file__).with_name("dataplane")))
_spec = importlib.util.spec_from_loader("dataplane", _loader)
dataplane = importlib.util.module_from_spec(_spec)
# dataclasses look their module up by name while the file executes.
sys.modules["dataplane"] = dataplane
_loader.exec_module(dataplane)

PING_OUTPUT = """PING 100.64.0.2 (100.64.0.2) 56(84) bytes of data.
64 bytes from 100.64.0.2: icmp_seq=1 ttl=64 time=0.412 ms
64 bytes from 100.64.0.2: icmp_seq=2 ttl=64 time=0.250 ms
64 bytes from 100.64.0.2: icmp_seq=2 ttl=64 time=9.000 ms (DUP!)
64 bytes from 100.64.0.2: icmp_seq=4 ttl=64 time=1.5 ms

--- 100.64.0.2 ping statistics ---
4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 31ms
"""


class PingTests(unittest.TestCase):
    def test_parses_one_time_per_sequence_number(self):
        self.assertEqual(dataplane.parse_ping_times(PING_OUTPUT), [0.412, 0.250, 1.5])

    def test_lost_replies_count_as_loss_not_latency(self):
        stats = dataplane.ping_stats(dataplane.parse_ping_times(PING_OUTPUT), 4)
        self.assertEqual(stats["loss_pct"], 25.0)
        self.assertEqual(stats["p50"], 0.412)
        self.assertEqual(stats["p99"], 1.5)

    def test_no_replies(self):
        stats = dataplane.ping_stats([], 200)
        self.assertEqual(stats, {"p50": None, "p99": None, "loss_pct": 100.0})


class PercentileTests(unittest.TestCase):
    def test_nearest_rank(self):
        values = [float(v) for v in range(1, 201)]
        self.assertEqual(dataplane.percentile(values, 50), 100.0)
        self.assertEqual(dataplane.percentile(values, 99), 198.0)
        self.assertEqual(dataplane.percentile([3.0], 99), 3.0)
        self.assertIsNone(dataplane.percentile([], 50))

    def test_median_skips_missing_runs(self):
        self.assertEqual(dataplane.median_of([3.0, None, 1.0, 2.0]), 2.0)
        self.assertIsNone(dataplane.median_of([None, None]))


class IperfTests(unittest.TestCase):
    def test_tcp(self):
        out = {"end": {"sum_sent": {"bits_per_second": 2.1e9, "bytes": 1_000, "retransmits": 42},
                       "sum_received": {"bits_per_second": 2e9, "bytes": 900}}}
        self.assertEqual(dataplane.parse_iperf_tcp(out), {"gbps": 2.0, "bytes": 900, "retransmits": 42})

    def test_udp_counts_delivered_packets(self):
        out = {"end": {"sum_received": {"seconds": 2.0, "packets": 1000, "lost_packets": 200,
                                        "lost_percent": 20.0}}}
        self.assertEqual(dataplane.parse_iperf_udp(out), {"pps": 400.0, "loss_pct": 20.0})

    def test_missing_summary_is_an_error(self):
        with self.assertRaises(dataplane.BenchError):
            dataplane.parse_iperf_tcp({"end": {}})
        with self.assertRaises(dataplane.BenchError):
            dataplane.parse_iperf_udp({"end": {"sum_received": {"seconds": 0}}})


class ProcTests(unittest.TestCase):
    def test_stat_with_awkward_command_name(self):
        line = "1234 (we (ft) d) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 99 1000 200"
        self.assertEqual(dataplane.parse_proc_stat(line), 325)

    def test_status_memory_in_bytes(self):
        text = "Name:\tweftd\nVmHWM:\t   12000 kB\nVmRSS:\t    8000 kB\nThreads:\t3\n"
        self.assertEqual(dataplane.parse_proc_status(text), {"VmHWM": 12_288_000, "VmRSS": 8_192_000})


class GuardTests(unittest.TestCase):
    def test_allows_test_ranges(self):
        for addr in ("192.0.2.1", "100.64.201.2", "100.127.255.254", "fd7a:115c::1"):
            self.assertEqual(dataplane.guard(addr), addr)

    def test_refuses_everything_else(self):
        for addr in ("8.8.8.8", "10.0.0.1", "192.0.3.1", "100.128.0.1", "2001:db8::1"):
            with self.assertRaises(dataplane.BenchError):
                dataplane.guard(addr)


class ArgumentTests(unittest.TestCase):
    def test_quick_is_one_short_run(self):
        args = dataplane.parse_args(["--quick", "--runs", "5"])
        self.assertEqual((args.runs, args.duration), (1, 3))

    def test_peers_are_checked(self):
        self.assertEqual(dataplane.peer_list("weft, boringtun"), ["weft", "boringtun"])
        with self.assertRaises(dataplane.argparse.ArgumentTypeError):
            dataplane.peer_list("weft,tailscale")
        with self.assertRaises(dataplane.argparse.ArgumentTypeError):
            dataplane.positive_int("0")


def medians(**values):
    base = {"tcp1_gbps": 1.0, "tcp1_retransmits": 1000, "udp64_kpps": 100.0, "ping_idle_p50_ms": 0.5,
            "ping_idle_p99_ms": 1.0, "ping_load_p99_ms": 2.0, "idle_rss_mb": 5.0}
    base.update(values)
    return base


class TargetTests(unittest.TestCase):
    def verdicts(self, weft, bt, wg):
        targets = dataplane.evaluate_targets({"weft": weft, "boringtun-t1": bt, "wireguard-go": wg}, "boringtun-t1")
        return [t["met"] for t in targets]

    def test_all_met(self):
        weft = medians(tcp1_gbps=6.0, tcp1_retransmits=5, udp64_kpps=250.0, ping_idle_p50_ms=0.4,
                       ping_load_p99_ms=3.0, idle_rss_mb=9.0)
        self.assertEqual(self.verdicts(weft, medians(), medians()), [True] * 7)

    def test_all_missed(self):
        weft = medians(tcp1_gbps=3.9, tcp1_retransmits=11, udp64_kpps=199.0, ping_idle_p50_ms=0.6,
                       ping_load_p99_ms=3.01, idle_rss_mb=10.5)
        self.assertEqual(self.verdicts(weft, medians(), medians(tcp1_gbps=0.65)), [False] * 7)

    def test_missing_peer_is_not_applicable(self):
        # The load-versus-idle and memory targets concern weft alone.
        targets = dataplane.evaluate_targets({"weft": medians()}, None)
        self.assertEqual([t["met"] for t in targets], [None] * 4 + [True, None, True])

    def test_best_boringtun_by_single_stream(self):
        results = {"boringtun": {"median": {"tcp1_gbps": 0.3}},
                   "boringtun-t1": {"median": {"tcp1_gbps": 0.8}},
                   "weft": {"median": {"tcp1_gbps": 9.0}}}
        self.assertEqual(dataplane.best_boringtun(results), "boringtun-t1")
        results["boringtun-t1"]["error"] = "did not start"
        self.assertEqual(dataplane.best_boringtun(results), "boringtun")


if __name__ == "__main__":
    unittest.main()
