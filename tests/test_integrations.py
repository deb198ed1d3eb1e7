"""The Lightning and Hugging Face scripts in examples/, each with gossip added in a few lines,
train as 4 gossip nodes (4 processes, real gRPC on 127.0.0.1) with the real libraries on CPU:
every node beats the untrained model, and the weights sum exactly to the founders' at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import node_config, wait_until

from gosgd_p2p.node import GossipNode, JoinError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: Runs an example as a script, with the node's "listening on ADDRESS" line on stderr.
RUNNER = (
    "import logging, runpy, sys; logging.basicConfig(level=logging.WARNING); "
    "logging.getLogger('gosgd_p2p.node').setLevel(logging.INFO); "
    "script = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')"
)
FINAL = re.compile(
    r"final weight (\S+) (?:val_acc|accuracy) ([0-9.]+) untrained ([0-9.]+) founded (True|False)"
)


class Script:
    """One example script run as a gossip node; its address is read from its stderr."""

    def __init__(self, tmp: Path, name: str, script: str, *args: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")  # fmt: skip
        self.err_path = tmp / f"{name}.err"
        self._err = open(self.err_path, "w")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(EXAMPLES / script), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=tmp,  # where Lightning writes its checkpoints/
        )  # fmt: skip
        self._listening = threading.Event()
        self.address = ""
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.write(line)
            if not self.address and " listening on " in line:
                self.address = line.split(" listening on ")[1].split()[0]
                self._listening.set()

    def wait_listening(self, timeout: float) -> str:
        if not self._listening.wait(timeout):
            raise AssertionError(f"no node started:\n{self.stderr()}")
        return self.address

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.err_path.read_text()

    def finish(self, timeout: float) -> tuple[float, float, float, bool]:
        """(final weight, accuracy, untrained accuracy, founded) from the script's last line."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            self._err.close()
        assert self.proc.returncode == 0, self.stderr()
        match = FINAL.search(out)
        assert match, out + self.stderr()
        weight, acc, untrained, founded = match.groups()
        return float(weight), float(acc), float(untrained), founded == "True"


Results = list[tuple[float, float, float, bool]]


def run_four(tmp_path: Path, script: str, timeout: float) -> tuple[Results, str]:
    """Node 0 first; the other three seeded with its address, as on four machines. Returns
    each node's result and the four nodes' logs (to explain a failure)."""
    first = Script(tmp_path, "node-0", script, "127.0.0.1:0")
    nodes = [first]
    try:
        seed = first.wait_listening(timeout)
        nodes += [Script(tmp_path, f"node-{i}", script, "127.0.0.1:0", seed) for i in (1, 2, 3)]
        results = [node.finish(timeout) for node in nodes]
        logs = "\n".join(f"--- node-{i} ---\n{node.stderr()}" for i, node in enumerate(nodes))
        return results, logs
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.proc.kill()


def check(results: Results, logs: str) -> None:
    # each waited for the 3 others before its first step, so all 4 founded (weight 1 each);
    # the conservation law: once every node finished, the weights sum to the founders'
    why = f"{results}\n{logs}"
    assert [founded for *_, founded in results] == [True] * 4, why
    assert math.fsum(w for w, *_ in results) == 4.0, why  # weights on the grid add exactly
    for _, acc, untrained, _ in results:
        assert acc > untrained + 0.2, why  # every node learned, well past the untrained model
    # gossip happened: a node that kept exactly its founding weight (1 or 0) never exchanged
    assert any(w not in (0.0, 1.0) for w, *_ in results), why


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_lightning_script_trains_as_four_gossip_nodes(tmp_path: Path) -> None:
    pytest.importorskip("lightning", reason="the [lightning] extra is not installed")
    check(*run_four(tmp_path, "lightning_gossip.py", timeout=240))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_huggingface_script_trains_as_four_gossip_nodes(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the [hf] extra is not installed")
    check(*run_four(tmp_path, "huggingface_gossip.py", timeout=240))


class Donor:
    """A plain founder stepping on its own thread: the running peer a resumed run rejoins."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.node = GossipNode(model, node_config("donor", "resume", p=0.0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="donor-steps", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.node.step()  # serves donations; p = 0: never pushes
            self._stop.wait(0.01)  # a training loop's pace, not a synchronisation

    def finish(self) -> float:
        self._stop.set()
        self._thread.join(10)
        weight = self.node.finish()
        self.node.close()
        return weight


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_lightning_run_resumed_from_its_checkpoint_rejoins_without_inventing_weight(
    tmp_path: Path,
) -> None:
    L = pytest.importorskip("lightning", reason="the [lightning] extra is not installed")
    from gosgd_p2p.integrations.lightning import GossipCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16
    )

    def fit(node_id: str, steps: int, ckpt_path: str | None, **kw: float) -> GossipCallback:
        config = node_config(node_id, "resume", p=0.5, peers=[donor.address], **kw)
        gossip = GossipCallback(config)
        trainer = L.Trainer(
            max_steps=steps, callbacks=[gossip], logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(tmp_path),
        )  # fmt: skip
        torch.manual_seed(0)
        trainer.fit(Module(), data, ckpt_path=ckpt_path)
        return gossip

    torch.manual_seed(0)
    donor_node = Donor(Module())
    donor = donor_node.node
    wait_until(lambda: donor.step_count > 0, 10, "the donor to train")
    try:
        first = fit("learner", 10, None)  # joins the running donor: 0, then half the donor's
        assert first.node is not None and first.node.joined
        checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
        saved = torch.load(checkpoint, weights_only=False)["callbacks"]["GossipCallback"]
        assert saved["step"] == 10 and saved["weight"] > 0.0

        # resumed from that checkpoint: it rejoins (never founds), its step carried over (a new
        # id: a donor gives one node id at most one state every 10 s)
        resumed = fit("learner-again", 20, str(checkpoint))
        assert resumed.node is not None and resumed.node.joined
        assert resumed.node.step_count == 20
    finally:
        donor_weight = donor_node.finish()
    # one founder's weight in all: the saved weight was not taken back, nothing was invented
    assert first.final_weight is not None and resumed.final_weight is not None
    total = donor_weight + first.final_weight + resumed.final_weight
    assert abs(total - 1.0) <= 1e-9, (donor_weight, first.final_weight, resumed.final_weight)

    # with no running peer to rejoin, a resumed run waits, then fails: founding anew would add
    # a founder's weight to the cluster
    with pytest.raises(JoinError, match="no running peer"):
        fit("learner-alone", 20, str(checkpoint), join_timeout_s=1.0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_huggingface_run_resumed_from_its_checkpoint_rejoins_without_inventing_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers", reason="the [hf] extra is not installed")
    from gosgd_p2p.integrations.huggingface import CHECKPOINT_FILE, GossipCallback

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": self.x[i], "labels": (self.x[i, 0] > 0).long()}

    def fit(node_id: str, steps: int, resume: str | None, **kw: float) -> GossipCallback:
        config = node_config(node_id, "resume", p=0.5, peers=[donor.address], **kw)
        gossip = GossipCallback(config)
        args = transformers.TrainingArguments(
            str(tmp_path), max_steps=steps, save_steps=10, per_device_train_batch_size=16,
            report_to=[], disable_tqdm=True, use_cpu=True, learning_rate=0.1,
        )  # fmt: skip
        torch.manual_seed(0)
        trainer = transformers.Trainer(
            model=Module(), args=args, train_dataset=Data(), callbacks=[gossip]
        )
        trainer.train(resume_from_checkpoint=resume)
        return gossip

    torch.manual_seed(0)
    donor_node = Donor(Module())
    donor = donor_node.node
    wait_until(lambda: donor.step_count > 0, 10, "the donor to train")
    checkpoint = tmp_path / "checkpoint-10"
    try:
        first = fit("learner", 10, None)  # joins the running donor: 0, then half the donor's
        assert first.node is not None and first.node.joined
        saved = json.loads((checkpoint / CHECKPOINT_FILE).read_text())
        assert saved["step"] == 10 and saved["weight"] > 0.0

        resumed = fit("learner-again", 20, str(checkpoint))
        assert resumed.node is not None and resumed.node.joined
        assert resumed.node.step_count == 20
    finally:
        donor_weight = donor_node.finish()
    assert first.final_weight is not None and resumed.final_weight is not None
    total = donor_weight + first.final_weight + resumed.final_weight
    assert abs(total - 1.0) <= 1e-9, (donor_weight, first.final_weight, resumed.final_weight)

    with pytest.raises(JoinError, match="no running peer"):
        fit("learner-alone", 20, str(checkpoint), join_timeout_s=1.0)
