"""Key-encoder EMA, queue wrap-around, shuffle-BN permutations and the exported backbone."""

from collections import deque

import pytest
import torch
import torchvision

from ilm_dist.eval.weights import build_classifier
from ilm_dist.moco.key_encoder import KeyEncoder
from ilm_dist.moco.queue import KeyQueue
from ilm_dist.moco.shuffle_bn import shuffled_forward, step_permutation
from ilm_dist.model.encoder import Encoder


def test_ema_update_matches_formula():
    query = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    key = KeyEncoder(query)
    before = [p.clone() for p in key.encoder.parameters()]
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
    key.update(query, momentum=0.99)
    for k_old, k_new, q in zip(before, key.encoder.parameters(), query.parameters(), strict=True):
        expected = (0.99 * k_old.double() + 0.01 * q.double()).float()
        torch.testing.assert_close(k_new, expected, rtol=1e-6, atol=1e-6)
        assert k_new.dtype == torch.float32 and not k_new.requires_grad


def test_ema_refuses_a_16_bit_copy_of_the_query():
    """The EMA must average the fp32 master weights; a bf16 module copy would round every update away."""
    query = torch.nn.Linear(5, 4)
    key = KeyEncoder(query)
    with pytest.raises(TypeError, match=r"\['torch.bfloat16'\], not the fp32 master weights"):
        key.update(query.to(torch.bfloat16), momentum=0.99)


def test_ema_update_of_a_channels_last_key_encoder_matches_formula():
    """model.channels_last: the key encoder is channels-last, the engine's (query) weights contiguous."""
    query = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    key = KeyEncoder(query).to(memory_format=torch.channels_last)
    before = [p.clone() for p in key.encoder.parameters()]
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(2):
        q = query
        key.update(q, momentum=0.9)
        for k_old, k_new, q_param in zip(before, key.encoder.parameters(), q.parameters(), strict=True):
            torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q_param.float(), rtol=1e-6, atol=1e-6)
            k_old.copy_(k_new)
    assert key.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not key.encoder[0].weight.is_contiguous()


def test_key_encoder_starts_as_copy_and_has_no_grad():
    query = Encoder("resnet18", dim=16, mlp=True)
    key = KeyEncoder(query)
    for q, k in zip(query.parameters(), key.encoder.parameters(), strict=True):
        assert torch.equal(q, k) and q is not k and not k.requires_grad


@pytest.mark.parametrize(("size", "batches"), [(10, [4, 4, 4, 4]), (7, [3, 5, 2, 9]), (5, [12])])
def test_queue_wraps_like_a_ring_buffer(size, batches):
    queue = KeyQueue(size, dim=2, device=torch.device("cpu"))
    ring = deque(queue.keys.clone(), maxlen=size)  # reference: FIFO of the newest `size` keys
    slots = list(range(size))
    written = 0
    for n in batches:
        keys = torch.arange(written, written + n, dtype=torch.float32)[:, None].repeat(1, 2)
        queue.enqueue(keys)
        ring.extend(keys)
        written += n
        assert queue.ptr == written % size
    # each slot holds the newest key written at that position (position = write count mod size)
    newest = {}
    for i in range(max(0, written - size), written):
        newest[i % size] = float(i)
    for slot, value in newest.items():
        assert queue.keys[slot, 0].item() == value
    assert sorted(k[0].item() for k in ring) == sorted(queue.keys[slots, 0].tolist())


def test_queue_state_roundtrip_and_shape_check():
    a = KeyQueue(8, 3, torch.device("cpu"), seed=1)
    a.enqueue(torch.ones(3, 3))
    b = KeyQueue(8, 3, torch.device("cpu"), seed=2)
    b.load_state_dict(a.state_dict())
    assert a.checksum() == b.checksum()
    with pytest.raises(ValueError, match="queue in checkpoint has shape"):
        KeyQueue(9, 3, torch.device("cpu")).load_state_dict(a.state_dict())


def test_shuffle_is_identity_on_one_rank_and_permutations_are_seeded():
    images = torch.randn(6, 3)
    out = shuffled_forward(lambda x: [x * 2, x.sum(1)], images, seed=0, step=3)
    torch.testing.assert_close(out[0], images * 2)
    p1, p2 = step_permutation(16, 0, 5, torch.device("cpu")), step_permutation(16, 0, 5, torch.device("cpu"))
    assert torch.equal(p1, p2) and sorted(p1.tolist()) == list(range(16))
    assert not torch.equal(p1, step_permutation(16, 0, 6, torch.device("cpu")))


def test_exported_backbone_is_a_torchvision_state_dict():
    encoder = Encoder("resnet18", dim=16, mlp=False).eval()
    resnet = build_classifier("resnet18", encoder.backbone_state_dict(), 1000, "export").eval()
    images = torch.randn(2, 3, 64, 64)
    reference = torchvision.models.resnet18()
    reference.load_state_dict(encoder.backbone_state_dict(), strict=False)
    resnet.fc = reference.fc = torch.nn.Identity()
    with torch.no_grad():
        pooled = encoder.backbone(images)["pooled"]
        torch.testing.assert_close(resnet(images), pooled)
        torch.testing.assert_close(reference.eval()(images), pooled)
    with pytest.raises(ValueError, match="do not fit resnet50"):
        build_classifier("resnet50", encoder.backbone_state_dict(), 1000, "export")
