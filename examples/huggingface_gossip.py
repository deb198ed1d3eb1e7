"""A Hugging Face Trainer script with gossip added: two imports, the seed, the callback and
its argument. No downloads: the model is a tiny BERT built from a config.

Four nodes, one per machine: `python huggingface_gossip.py 0.0.0.0:7070` on the first and
`python huggingface_gossip.py 0.0.0.0:7070 FIRST_HOST:7070` on the three others (on one host,
listen on 127.0.0.1:0; tests/test_integrations.py runs four). Each waits until it sees the
three others and they see each other, so all four found the cluster (weight 1 each), start
training together, and their weights end summing to 4.
"""

import os
import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from gosgd_p2p import NodeConfig, cluster_seed  # gossip
from gosgd_p2p.integrations.huggingface import GossipCallback  # gossip


class Parity(torch.utils.data.Dataset):
    """Sequences of 8 tokens from {1, 2}; the label says whether token 2 is in the majority."""

    def __init__(self, seed: int, n: int) -> None:
        self.ids = torch.randint(1, 3, (n, 8), generator=torch.Generator().manual_seed(seed))
        self.labels = ((self.ids == 2).sum(1) > 4).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def accuracy(pred) -> dict:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


listen, peers = sys.argv[1], sys.argv[2:]
torch.manual_seed(cluster_seed("hf-run"))  # gossip: founders start from the same model
model = BertForSequenceClassification(BertConfig(
    vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=16, num_labels=2))  # fmt: skip
config = NodeConfig(cluster="hf-run", listen=listen, peers=peers, p=0.1)  # gossip
gossip = GossipCallback(config, wait_for_peers=3)  # gossip: 4 nodes start together
args = TrainingArguments(tempfile.mkdtemp(), max_steps=150, learning_rate=3e-3,
                         per_device_train_batch_size=32, seed=os.getpid() % 10_000, use_cpu=True,
                         report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
trainer = Trainer(model=model, args=args, train_dataset=Parity(os.getpid(), 32 * 150),
                  eval_dataset=Parity(0, 1000), compute_metrics=accuracy,
                  callbacks=[gossip])  # fmt: skip
untrained = trainer.evaluate()["eval_accuracy"]
trainer.train()
print(f"final weight {gossip.final_weight!r} accuracy {trainer.evaluate()['eval_accuracy']:.4f} "
      f"untrained {untrained:.4f} founded {not gossip.node.joined}")  # fmt: skip
