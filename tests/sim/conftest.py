from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_sim.kernel import Kernel
from tests.pki import PKI
from tests.sim.harness import Agent, start_agent, unique_endpoint, write_config


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    with Kernel(endpoint=unique_endpoint()) as k:
        k.add_netns(None)
        yield k


@pytest.fixture(scope="module")
def agent(kernel: Kernel, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    config = write_config(tmp_path_factory.mktemp("cfg"), pki, kernel.endpoint)
    agent = start_agent(kernel, config)
    yield agent
    assert agent.stop() == 0, "\n".join(agent.log)


def configured_agent(kernel: Kernel, pki: PKI, directory: Path, **options: object) -> Agent:
    return start_agent(kernel, write_config(directory, pki, kernel.endpoint, **options))  # type: ignore[arg-type]
