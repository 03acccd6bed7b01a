"""Shared pytest fixtures.

CI has no GPU: Triton kernels run in Triton's CPU interpreter, which must be switched on before any
``@triton.jit`` function is first launched.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton reads TRITON_INTERPRET when a @triton.jit function is created: import every kernel now, so
    # a test that switches the interpreter off (to check the no-GPU error) cannot be the first importer.
    try:
        import importlib
        import pkgutil

        import cortexflow.kernels

        for _module in pkgutil.iter_modules(cortexflow.kernels.__path__):
            importlib.import_module(f"cortexflow.kernels.{_module.name}")
    except ImportError:  # no triton: the kernel tests fail with their own message
        pass
    from interpreter_patching import install as _install_interpreter_patching
    from interpreter_patching import skip_unreported_overflow_checks as _skip_unreported_overflow_checks

    _install_interpreter_patching()
    _skip_unreported_overflow_checks()


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """Path of a tiny SentencePiece ``tokenizer.model`` trained in process (pad 0, eos 1, bos 2, unk 3).

    Like PaliGemma's it has byte fallback (any text encodes), splits digits and has a "\\n" piece.
    """
    from cortexflow.tiny_tokenizer import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.model")


@pytest.fixture(scope="module")
def openpi():
    """``openpi_client.websocket_client_policy``; a clear failure (not a skip) when it is not installed."""
    try:
        from openpi_client import websocket_client_policy
    except ImportError as err:
        pytest.fail(f"openpi-client is needed for these tests: pip install --no-deps openpi-client==0.1.2 ({err})")
    return websocket_client_policy


@pytest.fixture
def start_server():
    """``start(policy_or_robot, **server_kwargs)`` -> a running PolicyServer on an ephemeral port; stopped after."""
    from cortexflow.serving.server import PolicyServer
    from serving_support import TIMEOUT, demo_policy

    servers = []

    def start(policy="droid", **kwargs):
        if isinstance(policy, str):
            policy = demo_policy(policy)
        server = PolicyServer(policy, "127.0.0.1", 0, **kwargs).start(timeout=TIMEOUT)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (restored after): the tiny models' small tensors, and the interpreter's,
    run faster so on a shared CI machine. A module asks for it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
