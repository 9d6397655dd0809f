"""A small transcription of the published TALLY code's training step (github huaxiuyao/TALLY at 5007cf0),
the yardstick of `protocol: reference` (tests/method/test_reference_protocol.py).

Line numbers cite that commit's files. What is left out does not change a step: file reading, the
samplers (batches are given), logging, and the index bookkeeping `labels_inverse` / `domains_inverse`
(dataset.py:193-194; identity here, every class and domain being present). The network is any module
with `.stem` (conv1 .. layer2, tally.py:86-92) and `.head` (layer3, layer4, avgpool, fc, tally.py:96-100).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F


def calculate_statistics(x):  # tally.py:7-13 (x.var: the unbiased variance)
    mu = x.mean(dim=[2, 3], keepdim=True)
    var = x.var(dim=[2, 3], keepdim=True)
    sig = (var + 1e-6).sqrt()
    norm = (x - mu) / sig
    return norm, mu, sig


def class_weights(cls_num_list):  # criterions.py:10-16 (reweight: main.py:132 -> utils.py:46-47)
    cls_num_list = np.asarray(cls_num_list)
    class_idx = cls_num_list != 0
    effective_num = 1.0 - np.power(0.999, cls_num_list)
    w = np.zeros_like(effective_num)
    w[class_idx] = (1.0 - 0.999) / effective_num[class_idx]
    w[class_idx] = w[class_idx] / np.sum(w[class_idx]) * class_idx.sum()
    return torch.tensor(w, dtype=torch.float)


class Memories:
    """The dataset object's memories: classes_norm, domains_sigma, domains_mean (dataset.py:205-207, there
    torch.randn; here given, so both sides start from the same noise) and update_statistics
    (dataset.py:233-254)."""

    def __init__(self, classes_norm, domains_sigma, domains_mean):
        self.classes_norm = classes_norm.clone()
        self.domains_sigma = domains_sigma.clone()
        self.domains_mean = domains_mean.clone()

    def update_statistics(self, norm, sig, mu, y1, d2):  # dataset.py:233-254, y1 = labels of idx1, d2 of idx2
        y_unique, d_unique = y1.unique(), d2.unique()
        classes_feat_update = torch.cat([norm[y1 == c].mean(dim=0).unsqueeze(dim=0) for c in y_unique])
        domains_mean_update = torch.cat([mu[d2 == d].mean(dim=0).unsqueeze(dim=0) for d in d_unique])
        domains_sigma_update = torch.cat([sig[d2 == d].mean(dim=0).unsqueeze(dim=0) for d in d_unique])
        self.classes_norm[y_unique] = 0.8 * self.classes_norm[y_unique] + 0.2 * classes_feat_update
        self.domains_mean[d_unique] = 0.8 * self.domains_mean[d_unique] + 0.2 * domains_mean_update
        self.domains_sigma[d_unique] = 0.8 * self.domains_sigma[d_unique] + 0.2 * domains_sigma_update


class Reference:
    """main.py's warmup() and train() loops, one step at a time; `workers` > 0 = its CUDA DataLoaders
    (num_workers 4, initialize.py:52-53): each epoch's workers hold a copy of the dataset, memories
    included, made when the epoch's iteration starts; __getitem__ (dataset.py:259-268) reads that copy
    while update_statistics writes the training process's object."""

    def __init__(self, net, memories: Memories, optimizer, cls_num_list, workers: int = 4):
        self.net, self.memories, self.optimizer, self.workers = net, memories, optimizer, workers
        self.weight = class_weights(cls_num_list)
        self.view = memories

    def start_epoch(self):
        self.view = copy.deepcopy(self.memories) if self.workers else self.memories

    def warmup_step(self, x, y, g):  # main.py:107-118
        self.net.train()
        feat = self.net.stem(x)
        norm, mu, sig = calculate_statistics(feat)  # tally.py:94
        out = (self.net.head(feat), norm, mu, sig)  # forward_train returns (fc, norm, mu, sig), tally.py:100
        y_hat, norm, sig, mu = out  # main.py:111: unpacked as (.., sig, mu)
        self.optimizer.zero_grad()
        loss = F.cross_entropy(y_hat, y)  # return_criterion(.., False): no weights (main.py:104)
        loss.backward()
        grads = [p.grad.clone() for p in self.net.parameters()]
        self.optimizer.step()
        self.memories.update_statistics(norm.detach(), sig.detach(), mu.detach(), y, g)  # main.py:118
        return loss.detach(), grads

    def tally_step(self, x1, y, x2, g, lam1, lam2):  # main.py:135-154; g: the domains of batch 2
        self.net.train()
        n1 = self.view.classes_norm[y]  # dataset.py:265-267 through the loader: data[4], data[5], data[6]
        s2, m2 = self.view.domains_sigma[g], self.view.domains_mean[g]
        y_hat, norm, sig, mu = self.forward_train_aug(x1, n1, x2, s2, m2, lam1, lam2)  # main.py:147
        self.optimizer.zero_grad()
        loss = F.cross_entropy(y_hat, y, weight=self.weight)  # criterions.py:27-28
        loss.backward()
        grads = [p.grad.clone() for p in self.net.parameters()]
        self.optimizer.step()
        self.memories.update_statistics(norm.detach(), sig.detach(), mu.detach(), y, g)  # main.py:154
        return loss.detach(), grads

    def forward_train_aug(self, x1, n1, x2, m2, s2, lam1, lam2):  # tally.py:102-130 (note: (.., m2, s2))
        x1, x2 = self.net.stem(x1), self.net.stem(x2)  # two passes, tally.py:108-122
        x, norm, sig, mu = self.ada(x1, n1, x2, m2, s2, lam1, lam2)  # tally.py:124
        return self.net.head(x), norm, sig, mu

    @staticmethod
    def ada(x1, z1, x2, m2, s2, lam1, lam2):  # AdaIN.forward, tally.py:35-55; lam: np.random.beta, folded
        mu1 = x1.mean(dim=[2, 3], keepdim=True)
        sig1 = (x1.var(dim=[2, 3], keepdim=True) + 1e-6).sqrt()
        norm1 = (x1 - mu1) / sig1
        l1 = lam1.reshape(-1, 1, 1, 1)
        norm_mix = l1 * norm1 + (1 - l1) * z1
        mu2 = x2.mean(dim=[2, 3], keepdim=True)
        sig2 = (x2.var(dim=[2, 3], keepdim=True) + 1e-6).sqrt()
        l2 = lam2.reshape(-1, 1, 1, 1)
        mu_mix = l2 * mu2 + (1 - l2) * m2
        sig_mix = l2 * sig2 + (1 - l2) * s2
        return sig_mix * norm_mix + mu_mix, norm1, sig2, mu2


def keeps(val_stats: list[float]) -> int:
    """The TALLY epoch (0-based among them) whose model is kept: save_best_model (utils.py:40-43) after
    each TALLY epoch, agg['val_stat'] starting as [0.] (main.py:205)."""
    agg, kept = [0.0], None
    for i, v in enumerate(val_stats):
        agg.append(v)
        if agg[-1] >= max(agg[:-1]):
            kept = i
    return kept
