#!/usr/bin/env python3
"""A reference for `dinotrain`'s linear probe: the same problem (L2-normalised CLS features,
standardised with the training set's mean and deviation, a bias column, mean softmax
cross-entropy + wd/2 * ||W||^2 without the bias row) solved to convergence by PyTorch's L-BFGS
in float64, and the k-NN@20 (T 0.07) of the same features.

    tools/fashion-mnist-split.py /tmp/fm --train 0 10000 --test 0 2000   # the demo split
    dinotrain embed --model out/run --data /tmp/fm/train --out /tmp/tr.npy --size 32
    dinotrain embed --model out/run --data /tmp/fm/test --out /tmp/te.npy --size 32
    python tools/probe-reference.py /tmp/tr.npy /tmp/te.npy [--wd 1e-4 1e-3]

Labels are the images' class folders (the `.npy.files.txt` beside each array). Compare with
`dinotrain knn --model out/run --demo --probe`.
"""

import argparse
import os

import numpy as np
import torch


def load(path):
    x = np.load(path)
    files = open(path + ".files.txt").read().split("\n")
    classes = [os.path.basename(os.path.dirname(f)) for f in files if f]
    return torch.tensor(x, dtype=torch.float64), classes


def knn_top1(train, train_y, test, test_y, k=20, temperature=0.07):
    train = torch.nn.functional.normalize(train, dim=1)
    test = torch.nn.functional.normalize(test, dim=1)
    sims, idx = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test), int(train_y.max()) + 1, dtype=sims.dtype)
    votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
    return (votes.argmax(1) == test_y).double().mean().item() * 100


def design(x, mean=None, std=None):
    x = torch.nn.functional.normalize(x, dim=1)
    if mean is None:
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    return torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1), mean, std


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("--wd", type=float, nargs="+", default=[1e-4])
    args = ap.parse_args()
    train, train_classes = load(args.train)
    test, test_classes = load(args.test)
    names = sorted(set(train_classes))
    train_y = torch.tensor([names.index(c) for c in train_classes])
    test_y = torch.tensor([names.index(c) for c in test_classes])
    print(f"k-NN@20 top-1 {knn_top1(train, train_y, test, test_y):.2f}%")
    a, mean, std = design(train)
    b, _, _ = design(test, mean, std)
    for wd in args.wd:
        w = torch.zeros(a.shape[1], len(names), dtype=a.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=2000, tolerance_grad=1e-10, tolerance_change=1e-14,
                                history_size=50, line_search_fn="strong_wolfe")

        def objective():
            return torch.nn.functional.cross_entropy(a @ w, train_y) + 0.5 * wd * (w[:-1] ** 2).sum()

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            train_acc = ((a @ w).argmax(1) == train_y).double().mean().item() * 100
            test_acc = ((b @ w).argmax(1) == test_y).double().mean().item() * 100
            print(f"weight decay {wd:g}: objective {objective().item():.5f}, "
                  f"training images {train_acc:.2f}%, test {test_acc:.2f}%")


if __name__ == "__main__":
    main()
