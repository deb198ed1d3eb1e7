"""A Lightning script with gossip added: two imports, the seed, the callback and its argument.

Four nodes, one per machine: `python lightning_gossip.py 0.0.0.0:7070` on the first and
`python lightning_gossip.py 0.0.0.0:7070 FIRST_HOST:7070` on the three others (on one host,
listen on 127.0.0.1:0; tests/test_integrations.py runs four). Each waits until it sees the
three others and they see each other, so all four found the cluster (weight 1 each), start
training together, and their weights end summing to 4.
"""

import os
import sys

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gosgd_p2p import NodeConfig, cluster_seed  # gossip
from gosgd_p2p.integrations.lightning import GossipCallback  # gossip


def dataset(seed: int, n: int) -> TensorDataset:
    x = torch.randn(n, 20, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x[:, 0] > x[:, 1]).long())


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


listen, peers = sys.argv[1], sys.argv[2:]
torch.manual_seed(cluster_seed("lightning-run"))  # gossip: founders start from the same model
model = Classifier()
config = NodeConfig(cluster="lightning-run", listen=listen, peers=peers, p=0.1)  # gossip
gossip = GossipCallback(config, wait_for_peers=3)  # gossip: 4 nodes start together
trainer = L.Trainer(max_steps=200, callbacks=[gossip], logger=False, enable_progress_bar=False)
train = DataLoader(dataset(os.getpid(), 64 * 200), batch_size=64, shuffle=True)
val = DataLoader(dataset(0, 2000), batch_size=500)
untrained = trainer.validate(model, val, verbose=False)[0]["val_acc"]
trainer.fit(model, train, val)
print(f"final weight {gossip.final_weight!r} val_acc {trainer.callback_metrics['val_acc']:.4f} "
      f"untrained {untrained:.4f} founded {not gossip.node.joined}")  # fmt: skip
