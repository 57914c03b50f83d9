import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ragged_index(users: int, candidates: int, seed: int = 0) -> torch.Tensor:
    """A ragged user_index: every user has >= 1 candidate, lists of different lengths, shuffled."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.arange(users), torch.randint(users, (candidates - users,), generator=g)])
    return idx[torch.randperm(candidates, generator=g)]
