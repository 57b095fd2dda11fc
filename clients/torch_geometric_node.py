"""torch_geometric: full-graph node classification, as PyG's GCN example trains Planetoid data:
one graph per batch (``Data`` with ``train_mask`` / ``val_mask``), the loss over the training nodes
only, on a synthetic two-community graph made in code."""

from __future__ import annotations

import _harness


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch_geometric.data import Data
    from torch_geometric.loader import DataLoader
    from torch_geometric.nn import GCNConv

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n, classes, features = 300, 3, 16
    y = torch.randint(0, classes, (n,), generator=g)
    # edges mostly within a class (homophily), features weakly informative
    src = torch.randint(0, n, (3000,), generator=g)
    dst = torch.randint(0, n, (3000,), generator=g)
    keep = (y[src] == y[dst]) | (torch.rand(3000, generator=g) < 0.1)
    edge_index = torch.stack([src[keep], dst[keep]])
    edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
    x = torch.randn(n, features, generator=g) + F.one_hot(y, features).float()
    perm = torch.randperm(n, generator=g)
    train_mask = torch.zeros(n, dtype=torch.bool)
    val_mask = torch.zeros(n, dtype=torch.bool)
    train_mask[perm[:120]] = True
    val_mask[perm[120:200]] = True
    data = Data(x=x, edge_index=edge_index, y=y, train_mask=train_mask, val_mask=val_mask)

    class NodeGCN(pl.LightningModule):
        def __init__(self, hidden: int = 32):
            super().__init__()
            self.conv1 = GCNConv(features, hidden)
            self.conv2 = GCNConv(hidden, classes)

        def forward(self, x, edge_index):
            x = F.dropout(x, p=0.5, training=self.training)
            x = self.conv1(x, edge_index).relu()
            x = F.dropout(x, p=0.5, training=self.training)
            return self.conv2(x, edge_index)

        def training_step(self, data, batch_idx):
            out = self(data.x, data.edge_index)
            loss = F.cross_entropy(out[data.train_mask], data.y[data.train_mask])
            self.log("train_loss", loss, batch_size=1)
            return loss

        def validation_step(self, data, batch_idx):
            out = self(data.x, data.edge_index)
            loss = F.cross_entropy(out[data.val_mask], data.y[data.val_mask])
            acc = (out[data.val_mask].argmax(-1) == data.y[data.val_mask]).float().mean()
            self.log("val_loss", loss, batch_size=1)
            self.log("val_acc", acc, batch_size=1)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01, weight_decay=5e-4)

    loader = DataLoader([data], batch_size=1)
    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=30), callbacks=recipe(monitor="val_loss")
    )
    trainer.fit(NodeGCN(), loader, DataLoader([data], batch_size=1))


if __name__ == "__main__":
    _harness.run("torch_geometric", "GCN node classifier (full graph, masks)", ["torch-geometric"], fit)
