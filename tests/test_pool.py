"""How ``TIERDET_TRITON_URL`` names the Triton endpoints, and how Triton's queue is read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from tierdet.serving.backend import Served
from tierdet.serving.pool import Target, parse_targets
from tierdet.serving.settings import Settings
from tierdet.serving.triton import queue_report


def test_a_list_of_endpoints_with_their_metrics_ports():
    fixed, names = parse_targets("10.0.0.1:8001, 10.0.0.2:9001?metrics=9002", 8002)
    assert fixed == [Target("10.0.0.1:8001", "http://10.0.0.1:8002/metrics"),
                     Target("10.0.0.2:9001", "http://10.0.0.2:9002/metrics")]
    assert names == []


def test_a_name_to_resolve_and_a_port_of_zero_reads_no_metrics():
    fixed, names = parse_targets("dns:///triton-headless.default.svc:8001,[::1]:8001", 0)
    assert names == [("triton-headless.default.svc", 8001)]
    assert fixed == [Target("[::1]:8001", None)]


@pytest.mark.parametrize("bad", ["", "triton", "triton:port", ":8001", "dns:///triton"])
def test_a_malformed_endpoint_stops_the_gateway_at_start(bad):
    with pytest.raises(ValidationError, match="triton_url"):
        Settings(triton_url=bad)


def test_the_queue_report_sums_over_versions_and_failure_reasons():
    text = "\n".join([
        "# HELP nv_inference_pending_request_count Instantaneous number of pending requests",
        "# TYPE nv_inference_pending_request_count gauge",
        'nv_inference_pending_request_count{model="efficientdet-d0",version="1"} 3',
        'nv_inference_pending_request_count{model="efficientdet-d0",version="2"} 1',
        'nv_inference_pending_request_count{model="damoyolo-ns",version="1"} 0',
        'nv_inference_request_success{model="efficientdet-d0",version="1"} 40',
        'nv_inference_request_failure{model="efficientdet-d0",reason="REJECTED",version="1"} 2',
        'nv_inference_request_failure{model="efficientdet-d0",reason="OTHER",version="1"} 1',
        'nv_inference_count{model="efficientdet-d0",version="1"} 40',
    ])
    report = queue_report(text)
    assert report.pending == {"efficientdet-d0": 4, "damoyolo-ns": 0}
    assert report.arrived == {"efficientdet-d0": 47, "damoyolo-ns": 0}


def test_the_queue_report_carries_what_the_device_did_on_a_real_triton(triton):
    """Answered requests, their queue wait, images, executions and the device's
    run time, as the router reads the device's speed from them (a real
    tritonserver's metrics page)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from conftest import TEST_MODEL
    from waiting import wait_until

    before = triton.server.queue().served.get(TEST_MODEL, Served())
    tensor = grpcclient.InferInput("images", [2, 512, 512, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((2, 512, 512, 3), np.uint8))
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        for _ in range(3):
            client.infer(TEST_MODEL, [tensor])
    # Triton counts an answer just after sending it.
    after = wait_until(lambda: (s := triton.server.queue().served[TEST_MODEL]).requests
                       >= before.requests + 3 and s, "Triton to count three answers")
    assert (after.requests - before.requests, after.images - before.images) == (3, 6)
    assert after.executions - before.executions == 3  # one call, one execution here
    assert after.queue_us > before.queue_us
    assert after.compute_us > before.compute_us  # the device's run, each request counted
