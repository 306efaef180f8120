import jax
import pytest

from jaxlm.config import MeshConfig
from jaxlm.errors import UserError
from jaxlm.sharding import axis_rules, batch_shards, batch_sharding, make_mesh


def test_minus_one_takes_the_remaining_devices():
    mesh = make_mesh(MeshConfig(axes={"data": -1, "fsdp": 2, "tensor": 1}))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert batch_shards(batch_sharding(mesh, axis_rules(MeshConfig(), mesh))) == 8


def test_explicit_devices_build_a_smaller_mesh():
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    assert mesh.size == 1


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, "multiple of 3 devices"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "use 4 devices but 8"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, "only one axis may be -1"),
        ({"data": 0, "fsdp": 1, "tensor": 1}, "mesh.axes.data must be positive"),
    ],
)
def test_mesh_that_does_not_fit_is_a_user_error(axes, message):
    with pytest.raises(UserError, match=message):
        make_mesh(MeshConfig(axes=axes))


def test_rule_naming_an_unknown_mesh_axis():
    cfg = MeshConfig(rules={"batch": ("data",), "embed": ("model",)})
    with pytest.raises(UserError, match="mesh.rules.embed names mesh axis 'model'"):
        axis_rules(cfg, make_mesh(cfg))
