"""`meshproxy demo`'s pure parts: counting the split, the summary, the configs it writes,
what it reads from the sidecars, and the plain-text view."""

from __future__ import annotations

import json
import math

import pytest

from proxy.config import parse_config
from proxy.demo import netns
from proxy.demo.dashboard import IdentityRow, Row, View, render_text
from proxy.demo.observe import CertWatch, Metrics, SidecarSample, rates
from proxy.demo.plan import (
    BACKENDS,
    CANARY_STEPS,
    FRONTEND,
    SERVICES,
    Files,
    loopback_plan,
    netns_plan,
    next_canary,
    sidecar_config,
    spiffe_id,
    split_target,
)
from proxy.demo.report import summarize, summary_text, write_report
from proxy.demo.services import caller_identity
from proxy.demo.tally import Tally, Timeline, format_split, split_error, split_of

FRONTEND_ID = spiffe_id(FRONTEND)

# -- counting --------------------------------------------------------------------------------


def test_a_tally_counts_success_split_and_latency():
    tally = Tally()
    for i in range(90):
        tally.record(200, 1000 + i, "v1", FRONTEND_ID)
    for i in range(10):
        tally.record(200, 3000 + i, "v2", FRONTEND_ID)
    tally.record(503, 500, error="fault_abort")
    tally.record(0, 5_000_000, error="timeout")
    assert tally.requests == 102 and tally.ok == 100
    assert tally.success_rate == pytest.approx(100 / 102)
    assert tally.failures == {"fault_abort": 1, "timeout": 1}
    assert tally.split() == {"v1": 0.9, "v2": 0.1}
    assert tally.callers == {FRONTEND_ID: 100}
    p50, p99 = tally.percentiles_ms([50, 99])
    assert p50 == pytest.approx(1.045, abs=0.01) and p99 == pytest.approx(3.0, abs=0.02)
    assert tally.max_ms == pytest.approx(5000, rel=0.001)
    assert sum(tally.by_version["v2"].values()) == 10


def test_an_empty_tally_has_no_rates():
    tally = Tally()
    assert tally.success_rate is None and tally.split() is None and tally.percentiles_ms([50]) is None


def test_tallies_merge():
    a, b = Tally(), Tally()
    a.record(200, 100, "v1")
    b.record(200, 100, "v2")
    b.record(502, 100)
    a.merge(b)
    assert (a.requests, a.ok, a.split(), dict(a.failures)) == (3, 2, {"v1": 0.5, "v2": 0.5}, {"502": 1})
    assert sum(a.latency.values()) == 3


def test_split_helpers():
    assert split_of({"v1": 3, "v2": 1}) == {"v1": 0.75, "v2": 0.25}
    assert split_of({}) is None
    assert split_error({"v1": 0.88, "v2": 0.12}, {"v1": 90, "v2": 10}) == pytest.approx(2.0)
    assert split_error({"v1": 0.5, "v2": 0.5}, {"v1": 50, "v2": 50}) == 0
    assert split_error(None, {"v1": 1}) == math.inf
    assert format_split({"v1": 0.903, "v2": 0.097}) == "90.3/9.7"
    assert format_split(None) == "-"


def test_the_timeline_keeps_windows_and_phases():
    timeline = Timeline(start=100.0, weights={"v1": 90, "v2": 10}, keep_seconds=5)
    for second in range(8):
        for _ in range(10):
            timeline.record(100.0 + second + 0.5, 200, 1000, "v1")
    assert timeline.window(108.2, 3).requests == 30  # seconds 5, 6, 7
    assert timeline.window(108.2, 20).requests == 50  # only 5 seconds are kept
    timeline.begin_phase(108.0, "v2 broken")
    timeline.record(108.5, 200, 1000, "v1")
    timeline.finish(110.0)
    assert [(p.name, p.start, p.end, p.tally.requests) for p in timeline.phases] == [
        ("steady", 0.0, 8.0, 80), ("v2 broken", 8.0, 10.0, 1)]
    assert timeline.total.requests == 81
    assert timeline.phases[1].weights == {"v1": 90, "v2": 10}


# -- the summary -----------------------------------------------------------------------------


def _timeline(v2_share: float, failures: int = 0) -> Timeline:
    timeline = Timeline(start=0.0, weights={"v1": 90, "v2": 10}, phase="canary 90/10")
    for i in range(1000):
        version = "v2" if i < v2_share * 1000 else "v1"
        timeline.record(1 + i / 100, 200, 2000, version, FRONTEND_ID)
    for _ in range(failures):
        timeline.record(5.0, 503, 2000, error="upstream_reset")
    timeline.begin_phase(11.0, "v2 broken, canary 90/10")
    timeline.record(11.5, 200, 2000, "v1", FRONTEND_ID)
    timeline.finish(12.0)
    return timeline


MTLS_OK = {"every_hop": True, "backend_answers": 1001, "caller_verified_as_frontend": 1001,
           "other_callers": {}, "tls_handshakes_ok": {"backend-v1": 3, "backend-v2": 2}}
REFUSED = [{"caller": "plaintext client", "target": "backend-v1", "outcome": "refused", "refused": True},
           {"caller": spiffe_id("intruder"), "target": "backend-v1", "outcome": "403 forbidden", "refused": True}]


def _summary(timeline: Timeline, **changes):
    arguments = {"threshold": 0.99, "rate": 200.0, "mode": "loopback", "mtls": MTLS_OK, "probes": REFUSED,
                 "rotations": {"frontend": 1}, "frontend": {"retries": 3, "v2_ejections": 1},
                 "split_tolerance": 4.0}
    arguments.update(changes)
    return summarize(timeline, **arguments)


def test_the_summary_passes_on_the_success_rate_and_checks_the_rest():
    summary = _summary(_timeline(0.1))
    assert summary["passed"] and summary["checks_passed"]
    assert summary["requests"] == 1001 and summary["success_rate"] == 1.0
    assert summary["steady_split"] == {"v1": 0.9, "v2": 0.1} and summary["steady_split_ok"]
    assert [p["name"] for p in summary["phases"]] == ["canary 90/10", "v2 broken, canary 90/10"]
    assert summary["phases"][0]["split_error_points"] == 0
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "p999", "max"}
    json.dumps(summary)  # it goes into summary.json as is
    text = summary_text(summary)
    assert "success rate   100.00%" in text and "PASSED" in text and "90.0/10.0" in text


def test_the_summary_fails_below_the_threshold():
    summary = _summary(_timeline(0.1, failures=20))
    assert not summary["passed"] and not summary["checks_passed"]
    assert summary["failures"] == {"upstream_reset": 20}
    assert "FAILED" in summary_text(summary)


def test_a_skewed_split_a_plaintext_hop_or_an_allowed_intruder_fail_the_checks():
    assert not _summary(_timeline(0.2))["steady_split_ok"]
    assert not _summary(_timeline(0.2))["checks_passed"]
    assert not _summary(_timeline(0.1), mtls={**MTLS_OK, "every_hop": False})["checks_passed"]
    allowed = [{**REFUSED[1], "outcome": "200", "refused": False}]
    summary = _summary(_timeline(0.1), probes=allowed)
    assert summary["passed"] and not summary["forbidden_refused"] and not summary["checks_passed"]
    assert "NOT REFUSED" in summary_text(summary)


def test_the_report_files(tmp_path):
    timeline = _timeline(0.1)
    summary = _summary(timeline)
    config = tmp_path / "frontend.yaml"
    config.write_text("node: {id: frontend}\n")
    written = write_report(tmp_path / "report", timeline, summary, [config, tmp_path / "missing.log"])
    report = tmp_path / "report"
    assert (report / "latency.hgrm").read_text().startswith("       Value     Percentile")
    assert "#[Max" in (report / "latency-v2.hgrm").read_text()
    assert (report / "mesh" / "frontend.yaml").exists()
    saved = json.loads((report / "summary.json").read_text())
    assert saved["passed"] and saved["report_dir"] == str(report)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in saved["png"] and "latency.png" not in written
    else:
        assert (report / "latency.png").read_bytes()[:4] == b"\x89PNG"


# -- the configs -----------------------------------------------------------------------------

FILES = Files("/ca/trust-bundle.pem", {name: f"/run/{name}.token" for name in SERVICES}, "/run/admin.token")


def _ports():
    yield from range(20000, 20100)


@pytest.mark.parametrize("name", SERVICES)
@pytest.mark.parametrize("weights", CANARY_STEPS)
def test_every_sidecar_config_is_valid(name, weights):
    for broken in (False, True):
        config = parse_config(json.dumps(sidecar_config(loopback_plan(_ports()), name, FILES, weights=weights,
                                                        broken=broken)))
        assert config.node.id == name and config.identity is not None
        assert config.identity.token_file == f"/run/{name}.token"


def test_the_backends_take_mtls_from_the_frontend_only():
    plan = loopback_plan(_ports())
    for name in BACKENDS.values():
        config = parse_config(json.dumps(sidecar_config(plan, name, FILES)))
        inbound = config.listener("inbound")
        assert inbound.tls is not None and inbound.tls.mode == "strict"
        assert [rule.allow.from_ for rule in inbound.policy] == [(FRONTEND_ID,)]
        assert str(inbound.address) == str(plan.services[name].inbound)


def test_the_frontend_splits_with_mtls_retries_and_ejection():
    plan = loopback_plan(_ports())
    config = parse_config(json.dumps(sidecar_config(plan, FRONTEND, FILES)))
    route = config.listener("outbound").routes[0]
    assert [(part.cluster, part.weight) for part in route.split] == [("backend-v1", 90), ("backend-v2", 10)]
    assert route.retry is not None and "5xx" in route.retry.on
    v1, v2 = config.cluster("backend-v1"), config.cluster("backend-v2")
    assert v1.tls.identity == (spiffe_id("backend-v1"),)
    assert v2.tls.identity == (spiffe_id("backend-v2"), spiffe_id("backend-v1"))
    # v1 is v2's fallback: a request v2 failed is retried there, and it takes v2's share
    # while v2 is ejected.
    assert [str(e.address) for e in v2.endpoints] == [str(plan.backend("v2").inbound),
                                                       str(plan.backend("v1").inbound)]
    assert v2.endpoints[0].weight > 100 * v2.endpoints[1].weight
    assert v2.outlier_detection is not None and v2.outlier_detection.max_ejection_percent >= 50
    assert config.listener("inbound").tls is None  # the edge: clients outside the mesh


def test_a_broken_backend_aborts_everything():
    config = parse_config(json.dumps(sidecar_config(loopback_plan(_ports()), "backend-v2", FILES, broken=True)))
    fault = config.listener("inbound").routes[0].fault
    assert fault is not None and fault.abort is not None
    assert (fault.abort.percent, fault.abort.status) == (100.0, 503)


def test_canary_steps_cycle_and_a_single_version_is_a_plain_cluster():
    steps = [CANARY_STEPS[0]]
    for _ in range(3):
        steps.append(next_canary(steps[-1]))
    assert steps == [{"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v1": 0, "v2": 100}, {"v1": 90, "v2": 10}]
    assert split_target({"v1": 0, "v2": 100}) == {"cluster": "backend-v2"}
    with pytest.raises(ValueError):
        split_target({"v1": 0, "v2": 0})


def test_the_netns_plan_uses_namespace_addresses_and_admin_tokens():
    names = ["ca", *SERVICES]
    plan = netns_plan({n: f"ns-{n}" for n in names}, {n: f"10.9.0.{i + 2}" for i, n in enumerate(names)})
    assert plan.netns and plan.ca_netns == "ns-ca" and str(plan.ca) == "10.9.0.2:15012"
    frontend = plan.services[FRONTEND]
    assert (str(frontend.inbound), str(frontend.app), str(frontend.outbound)) == (
        "10.9.0.3:15006", "127.0.0.1:9000", "127.0.0.1:15001")
    config = parse_config(json.dumps(sidecar_config(plan, FRONTEND, FILES)))
    assert config.admin.token_file == "/run/admin.token"  # an admin plane off loopback needs one


def test_netns_needs_root(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "root" in netns.unavailable_reason()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    assert "iproute2" in netns.unavailable_reason()


def test_the_bridge_subnet_avoids_the_hosts_networks():
    import ipaddress

    used = [ipaddress.IPv4Network("10.200.5.0/24"), ipaddress.IPv4Network("10.200.6.0/23")]
    assert str(netns.pick_subnet(used, 5)) == "10.200.8.0/24"


# -- what the sidecars say -------------------------------------------------------------------

METRICS = """\
# TYPE meshproxy_requests_total counter
meshproxy_requests_total{listener="inbound",route="app",code_class="2xx"} 95.0
meshproxy_requests_total{listener="inbound",route="app",code_class="5xx"} 4.0
meshproxy_requests_total{listener="inbound",route="app",code_class="none"} 1.0
meshproxy_requests_total{listener="outbound",route="backend",code_class="2xx"} 1000.0
# TYPE meshproxy_upstream_retries_total counter
meshproxy_upstream_retries_total{cluster="backend-v1"} 2.0
meshproxy_upstream_retries_total{cluster="backend-v2"} 5.0
# TYPE meshproxy_upstream_endpoint_healthy gauge
meshproxy_upstream_endpoint_healthy{cluster="backend-v2",endpoint="127.0.0.1:1"} 0.0
# TYPE meshproxy_upstream_endpoint_ejections_total counter
meshproxy_upstream_endpoint_ejections_total{cluster="backend-v2",endpoint="127.0.0.1:1"} 2.0
# TYPE meshproxy_downstream_tls_handshakes_total counter
meshproxy_downstream_tls_handshakes_total{listener="inbound",result="ok"} 7.0
meshproxy_downstream_tls_handshakes_total{listener="inbound",result="failed"} 1.0
# TYPE meshproxy_authz_decisions_total counter
meshproxy_authz_decisions_total{listener="inbound",decision="deny"} 1.0
# TYPE meshproxy_identity_cert_expiry_seconds gauge
meshproxy_identity_cert_expiry_seconds 1.7e+09
# TYPE meshproxy_identity_rotations_total counter
meshproxy_identity_rotations_total 3.0
"""


def test_a_sidecar_sample_from_metrics_and_latency():
    metrics = Metrics.parse(METRICS)
    assert metrics.value("meshproxy_requests_total", listener="inbound") == 100
    latency = {"listeners": {"inbound": {"count": 100, "p50": 0.6, "p99": 2.5}}}
    sample = SidecarSample.read(10.0, metrics, latency)
    assert (sample.requests, sample.failed, sample.retries) == (100, 5, 7)
    assert (sample.p50_ms, sample.p99_ms, sample.cert_expiry, sample.rotations) == (0.6, 2.5, 1.7e9, 3)
    assert (sample.handshakes_ok, sample.handshakes_failed, sample.authz_denied) == (7, 1, 1)
    assert sample.healthy == {"backend-v2/127.0.0.1:1": False}
    assert sample.ejections == {"backend-v2/127.0.0.1:1": 2}
    assert SidecarSample.read(0.0, Metrics.parse(""), None).cert_expiry is None


def test_rates_between_two_samples():
    first = SidecarSample.read(10.0, Metrics.parse(METRICS), None)
    later = Metrics.parse(METRICS.replace('"2xx"} 95.0', '"2xx"} 295.0').replace('backend-v2"} 5.0', 'backend-v2"} 9.0'))
    second = SidecarSample.read(12.0, later, None)
    result = rates(first, second)
    assert result.requests_per_s == 100 and result.success_rate == 1.0 and result.retries_per_s == 2
    assert rates(None, second).success_rate is None


def test_cert_watch_reads_serials_from_log_lines_split_anywhere():
    watch = CertWatch()
    line = ("2026-01-01 INFO identity spiffe://mesh.local/ns/demo/sa/frontend: certificate serial {} "
            "valid until 2026-01-01T00:00:20+00:00\n")
    text = line.format("abc123") + "noise\n" + line.format("def456")
    assert watch.feed(text[:30]) == []
    assert watch.feed(text[30:]) == ["abc123", "def456"]
    assert watch.serial == "def456" and watch.identity.endswith("/frontend")


def test_caller_identity_from_xfcc():
    xfcc = f'By=spiffe://mesh.local/ns/demo/sa/backend-v1;Hash=ab12;Subject="";URI={FRONTEND_ID}'
    assert caller_identity(xfcc) == FRONTEND_ID
    assert caller_identity(f"URI=spiffe://a/b,{xfcc}") == FRONTEND_ID
    assert caller_identity(None) == "" and caller_identity("Hash=1") == ""


def test_the_plain_text_view():
    view = View("meshproxy demo", [Row("frontend", "http://127.0.0.1:1", 200.0, 0.995, 1.234, 9.5, "retries 0/s")],
                [IdentityRow("frontend", FRONTEND_ID, "abc", 12.4, 2)], ["canary: 90/10"], ["12:00:00 ready"],
                "keys: [q] quit")
    text = render_text(view)
    assert "http://127.0.0.1:1" in text and "99.5%" in text and "1.23" in text and "retries 0/s" in text
    assert FRONTEND_ID in text and "12s" in text and "12:00:00 ready" in text and text.endswith("quit\n")
    assert "\x1b" not in text
