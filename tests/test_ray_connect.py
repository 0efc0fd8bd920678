"""ilm_dist.ray_connect: what ``init_ray`` asks of Ray (a stand-in ``ray`` module records it, so no Ray
starts) and the one-line errors for an address Ray cannot join. (Real Ray at an address with no cluster
retries for minutes before it raises: an address where nothing listens is refused before Ray is asked.)"""

import socket
import sys
import types

import pytest

from ilm_dist.errors import InputError
from ilm_dist.ray_connect import OBJECT_STORE_BYTES, connection_error, init_ray


@pytest.fixture
def fake_ray(monkeypatch):
    """A ``ray`` module whose ``init`` records its arguments, or raises ``fake_ray.error`` when set."""
    ray = types.ModuleType("ray")
    ray.calls, ray.error = [], None

    def init(**kwargs):
        ray.calls.append(kwargs)
        if ray.error is not None:
            raise ray.error

    ray.init = init
    monkeypatch.setitem(sys.modules, "ray", ray)
    return ray


@pytest.fixture
def listening():
    """``host:port`` of a socket that accepts connections (a stand-in for a Ray head's port)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def closed():
    """``host:port`` where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_no_address_starts_a_light_local_instance(fake_ray):
    init_ray(None, num_cpus=3, num_gpus=0)
    assert fake_ray.calls == [
        {"num_cpus": 3, "num_gpus": 0, "include_dashboard": False, "object_store_memory": 256 * 2**20}
    ]
    assert OBJECT_STORE_BYTES == 268435456


def test_an_address_is_joined_as_given(fake_ray, listening):
    init_ray(listening)
    init_ray("auto")
    assert fake_ray.calls == [{"address": listening}, {"address": "auto"}]


def test_an_address_where_nothing_listens_is_one_line_before_ray_is_asked(fake_ray, closed):
    with pytest.raises(InputError) as err:
        init_ray(closed)
    assert str(err.value).startswith(f"--address {closed}: nothing answers there (")
    assert str(err.value).endswith("start a cluster with `ray start --head` and pass the address it prints")
    assert "\n" not in str(err.value) and fake_ray.calls == []


@pytest.mark.parametrize(("cpus", "gpus"), [(2, None), (None, 1), (0, 0)])
def test_local_sizes_with_an_address_are_refused_before_connecting(fake_ray, cpus, gpus):
    with pytest.raises(InputError) as err:
        init_ray("auto", num_cpus=cpus, num_gpus=gpus)
    assert str(err.value) == (
        "--address auto: --num-cpus/--num-gpus size a local Ray instance; a cluster has its own"
    )
    assert fake_ray.calls == []


@pytest.mark.parametrize(
    "error",
    [ConnectionError("Could not find any running Ray instance.\nmore\n"), RuntimeError("\n  boom  \nx")],
)
def test_a_failed_join_is_one_input_error_naming_the_address(fake_ray, listening, error):
    fake_ray.error = error
    with pytest.raises(InputError) as err:
        init_ray(listening)
    first = str(error).strip().splitlines()[0].strip()
    assert str(err.value) == (
        f"--address {listening}: cannot join a Ray cluster there ({first}); start one with "
        "`ray start --head` and pass the address it prints"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chain of tracebacks


def test_other_errors_are_not_hidden(fake_ray, listening):
    fake_ray.error = KeyError("bug")
    with pytest.raises(KeyError):
        init_ray(listening)


class AuthenticationError(Exception):
    """Named as Ray's token-authentication failure."""


def chained(inner: BaseException, outer: BaseException, as_cause: bool) -> BaseException:
    """``outer`` raised while handling ``inner`` (``raise ... from`` when ``as_cause``)."""
    try:
        try:
            raise inner
        except BaseException as err:
            if as_cause:
                raise outer from err
            raise outer  # noqa: B904 (the implicit context is what is tested)
    except BaseException as err:
        return err


@pytest.mark.parametrize(
    "error",
    [
        chained(AuthenticationError("denied"), ConnectionError("retries exhausted"), as_cause=True),
        chained(ValueError("status InvalidAuthToken"), RuntimeError("failed"), as_cause=False),
        RuntimeError("rpc error: InvalidAuthToken"),
    ],
)
def test_a_token_refusal_anywhere_in_the_chain_says_what_to_set(error):
    message = connection_error("10.0.0.5:6379", error)
    assert message.startswith("--address 10.0.0.5:6379: the Ray cluster refused the connection")
    assert "RAY_AUTH_MODE=token" in message and "\n" not in message


def test_an_empty_message_names_the_error_type():
    assert "there (ConnectionError);" in connection_error("h:1", ConnectionError())
