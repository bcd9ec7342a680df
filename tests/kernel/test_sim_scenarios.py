"""The scenario suite on kernel-sim, once per profile of the kernels the real-kernel tier boots
(6.12.95, 6.12.117, 7.3), against the same expectations as the real kernel
(tests/kernel/test_real_kernel.py)."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator

import pytest

from kernel_sim.kernel import Kernel
from kernel_sim.nvme import NVMeKeyring
from kernel_sim.profile import LINUX_6_12, LINUX_6_12_117, LINUX_7_3, KernelProfile
from tests.kernel.scenarios import NVME_QUEUES, SCENARIOS
from tests.kernel.sim_scenarios import SimScenarios
from tests.pki import PKI
from tests.sim.harness import Agent, start_agent, unique_endpoint

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module", params=[LINUX_6_12, LINUX_6_12_117, LINUX_7_3],
                ids=lambda p: p.name)
def sim(pki: PKI, tmp_path_factory: pytest.TempPathFactory,
        request: pytest.FixtureRequest) -> Iterator[SimScenarios]:
    profile: KernelProfile = request.param
    directory = tmp_path_factory.mktemp("scenarios")
    ring_name = f"tlshd-test-{os.getpid()}-scenarios-nvme"
    ring = NVMeKeyring.create(name=ring_name)
    counter = itertools.count()
    agents: list[Agent] = []
    with Kernel(endpoint=unique_endpoint(), profile=profile) as kernel:
        kernel.add_netns(None)

        def start(text: str) -> None:
            config = directory / f"agent-{next(counter)}.conf"
            config.write_text(text)
            agents.append(start_agent(kernel, config))

        def stop() -> None:
            agent = agents.pop()
            assert agent.stop() == 0, "\n".join(agent.log)
            with socket.socket() as probe:
                ns = kernel.netns_of(probe)
            assert kernel.wait_for(lambda: kernel.listeners(ns) == 0, 5)

        scenarios = SimScenarios(kernel, pki, ring, ring_name, start, stop)
        start(scenarios.config())
        try:
            yield scenarios
        finally:
            while agents:
                stop()
            ring.close()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_on_kernel_sim(sim: SimScenarios, name: str) -> None:
    consumer_errno, evidence = sim.run(name)
    assert SCENARIOS[name].check(consumer_errno, evidence) == []
    if name == "nvme_psk_sha384":  # the host chose the SHA-384 PSK, and both sides used it
        assert sim.pskids == [sim.sha384_serial] * 2 * NVME_QUEUES
