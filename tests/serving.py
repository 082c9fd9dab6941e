"""What the server and black-box client tests share: a tiny teacher, its reference answers,
a slow wrapper that makes concurrent requests pile up, and stopping a server process."""
import subprocess
import time

import torch

SHAPE = [1, 4, 4]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()


def ref_probs(model, x):
    with torch.no_grad():
        return torch.softmax(model(x), 1)


class Slow(torch.nn.Module):
    """``model`` taking ``seconds`` longer per call."""

    def __init__(self, model, seconds):
        super().__init__()
        self.m, self.seconds = model, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.m(x)


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server process; kill it if it has not exited after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
