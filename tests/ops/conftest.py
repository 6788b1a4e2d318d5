"""Op tests allocate through NaN-poisoned `torch.empty*`, so a kernel that leaves part of its output unwritten (or
reads memory nothing wrote) fails loudly instead of passing on lucky zeros (flash-linear-attention's trick)."""

import pytest
import torch


def _poisoned(factory):
    def make(*args, **kwargs):
        out = factory(*args, **kwargs)
        with torch.no_grad():  # poisoning is not part of the graph (Inductor allocates leaves that require grad)
            if out.is_floating_point():
                out.fill_(float("nan"))
            elif out.dtype not in (torch.bool,) and not out.is_complex():
                out.fill_(-(2**30) if out.dtype in (torch.int32, torch.int64) else 0)
        return out

    return make


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    original_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poisoned(original_new_empty)(self, *a, **k))
