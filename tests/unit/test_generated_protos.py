"""The committed generated modules (the debug API, KEDA's external scaler) are exactly what
``python -m tools.gen_protos`` produces, and KEDA's interface is exactly what KEDA sends."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tools import gen_protos


def test_generated_modules_are_up_to_date() -> None:
    differences = gen_protos.stale()
    assert not differences, "out of date; run python -m tools.gen_protos\n" + "\n".join(
        differences.values()
    )


def test_a_changed_proto_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(gen_protos.PROTO_ROOT, protos)
    proto = protos / "extproc" / "debug" / "v1" / "debug.proto"
    proto.write_text(proto.read_text() + "\nmessage Added { string field = 1; }\n")
    monkeypatch.setattr(gen_protos, "PROTO_ROOT", protos)
    stale = gen_protos.stale()
    assert set(stale) == {
        Path("extproc/debug/v1/debug_pb2.py"),
        Path("extproc/debug/v1/debug_pb2.pyi"),
    }
    assert "Added" in stale[Path("extproc/debug/v1/debug_pb2.pyi")]


def test_the_keda_interface_is_exactly_what_keda_sends() -> None:
    """Names and field numbers KEDA's client uses; a change here would break every trigger."""
    from extproc.autoscaling.externalscaler import externalscaler_pb2 as pb

    assert pb.DESCRIPTOR.package == "externalscaler"
    service = pb.DESCRIPTOR.services_by_name["ExternalScaler"]
    methods = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods
    }
    assert methods == {
        "IsActive": ("ScaledObjectRef", "IsActiveResponse", False),
        "StreamIsActive": ("ScaledObjectRef", "IsActiveResponse", True),
        "GetMetricSpec": ("ScaledObjectRef", "GetMetricSpecResponse", False),
        "GetMetrics": ("GetMetricsRequest", "GetMetricsResponse", False),
        "StreamMetricSpec": ("ScaledObjectRef", "GetMetricSpecResponse", True),
    }
    fields = {
        message.name: {f.name: f.number for f in message.fields}
        for message in pb.DESCRIPTOR.message_types_by_name.values()
    }
    assert fields == {
        "ScaledObjectRef": {"name": 1, "namespace": 2, "scalerMetadata": 3},
        "IsActiveResponse": {"result": 1},
        "GetMetricSpecResponse": {"metricSpecs": 1},
        "MetricSpec": {"metricName": 1, "targetSize": 2, "targetSizeFloat": 3},
        "GetMetricsRequest": {"scaledObjectRef": 1, "metricName": 2},
        "GetMetricsResponse": {"metricValues": 1},
        "MetricValue": {"metricName": 1, "metricValue": 2, "metricValueFloat": 3},
    }
    metadata = pb.ScaledObjectRef.DESCRIPTOR.fields_by_name["scalerMetadata"]
    assert metadata.message_type.GetOptions().map_entry
