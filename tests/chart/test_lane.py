"""The chart's provisioning reserve (run --provisioning-reserve)."""

from __future__ import annotations

import helm_python as helm
import pytest

import chartlib


def args(values=None):
    objs = chartlib.render(values)
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_provisioning_reserve_is_passed_only_when_changed():
    assert "--provisioning-reserve" not in args(), "the default is the operator's own"
    for value, text in ((0.25, "0.25"), (0, "0"), (0.5, "0.5")):
        a = args({"provisioningReserve": value})
        assert a[a.index("--provisioning-reserve") + 1] == text


@pytest.mark.parametrize("bad", [0.6, -0.1, "10%", True])
def test_provisioning_reserve_out_of_range_is_refused(bad):
    with pytest.raises(helm.HelmError):
        chartlib.load_chart().validate_schema({"provisioningReserve": bad})
