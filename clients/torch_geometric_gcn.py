"""torch_geometric: a GCN graph classifier in a LightningModule fed PyG ``Batch`` objects
(nodes of many graphs concatenated, an assignment vector ``batch.batch``), as PyG's
Lightning examples build it, on small random graphs made in code."""

from __future__ import annotations

import _harness


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch_geometric.data import Data
    from torch_geometric.loader import DataLoader
    from torch_geometric.nn import GCNConv, global_mean_pool

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)

    def graph(label: int) -> Data:
        n = int(torch.randint(6, 14, (1,), generator=g))
        # class 1: denser graphs with shifted features; the model has to read both
        p = 0.5 if label else 0.2
        adj = (torch.rand(n, n, generator=g) < p).triu(1)
        edge_index = adj.nonzero().t()
        edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
        x = torch.randn(n, 8, generator=g) + 0.5 * label
        return Data(x=x, edge_index=edge_index, y=torch.tensor([label]))

    graphs = [graph(i % 2) for i in range(320)]
    train_loader = DataLoader(graphs[:256], batch_size=32, shuffle=True)
    val_loader = DataLoader(graphs[256:], batch_size=32)

    class GCN(pl.LightningModule):
        def __init__(self, in_channels: int = 8, hidden: int = 32, classes: int = 2):
            super().__init__()
            self.conv1 = GCNConv(in_channels, hidden)
            self.conv2 = GCNConv(hidden, hidden)
            self.lin = torch.nn.Linear(hidden, classes)

        def forward(self, x, edge_index, batch):
            x = self.conv1(x, edge_index).relu()
            x = self.conv2(x, edge_index).relu()
            return self.lin(global_mean_pool(x, batch))

        def training_step(self, data, batch_idx):
            out = self(data.x, data.edge_index, data.batch)
            loss = F.cross_entropy(out, data.y)
            self.log("train_loss", loss, batch_size=data.num_graphs)
            return loss

        def validation_step(self, data, batch_idx):
            out = self(data.x, data.edge_index, data.batch)
            self.log("val_loss", F.cross_entropy(out, data.y), batch_size=data.num_graphs)
            acc = (out.argmax(-1) == data.y).float().mean()
            self.log("val_acc", acc, batch_size=data.num_graphs)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3), callbacks=recipe(monitor="val_loss")
    )
    trainer.fit(GCN(), train_loader, val_loader)


if __name__ == "__main__":
    _harness.run("torch_geometric", "GCN graph classifier", ["torch-geometric"], fit)
