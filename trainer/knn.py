"""Weighted k-nearest-neighbour classification on embeddings (Wu et al. 2018), as BYOL
papers and libraries report it: cosine similarity, k=200, votes weighted by exp(sim / T)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from contract.preprocess import Preprocessing


@torch.no_grad()
def embed(encoder: torch.nn.Module, images: torch.Tensor, pre: Preprocessing, device: torch.device,
          batch_size: int = 512, precision: str = "fp32", progress: bool = False,
          desc: str = "embedding") -> torch.Tensor:
    """uint8 [N, 3, S, S] images already resized and cropped by the contract -> float32 [N, D]."""
    from tqdm import tqdm
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = pre.normalize_tensor(images[start:start + batch_size].to(device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out.append(encoder(x).float())
    encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores [N_test, C] from the k most similar training embeddings."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(test_features), chunk):
        q = F.normalize(test_features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                 k: int = 200, temperature: float = 0.1) -> dict:
    scores = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    top1 = (top[:, 0] == test_labels).float().mean().item()
    top5 = (top == test_labels[:, None]).any(1).float().mean().item()
    return {"top1": top1, "top5": top5}
