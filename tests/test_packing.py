"""Packing documents into rows, and the model's document-boundary attention over packed rows."""

import json

import pytest
import torch

from chameleon_lm import Chameleon, ChameleonConfig
from chameleon_lm.data.packing import IGNORE_INDEX, Packer
from chameleon_lm.documents import EncodedDocument
from chameleon_lm.model import transformer
from chameleon_lm.tokenizers.vocab import IMAGE, TEXT
from chameleon_lm.training.loss import lm_loss_sums

PAD = 1


def random_doc(n: int, vocab: int = 512) -> EncodedDocument:
    """A document of n tokens with some image tokens and some tokens out of the loss."""
    modality = torch.where(torch.rand(n) < 0.4, IMAGE, TEXT).to(torch.int8)
    return EncodedDocument(torch.randint(2, vocab, (n,)), modality, torch.rand(n) < 0.8)


def numbered_docs(lengths: list[int]) -> list[EncodedDocument]:
    """Documents whose token ids are all distinct (a token's id tells where it came from)."""
    docs, next_id = [], 2
    for n in lengths:
        ids = torch.arange(next_id, next_id + n)
        next_id += n
        docs.append(EncodedDocument(ids, torch.full((n,), TEXT, dtype=torch.int8),
                                    torch.ones(n, dtype=torch.bool)))
    return docs


class Stream:
    """A resumable document stream: ``(["s", i], docs[i])`` for i = start, start + 1, …"""

    def __init__(self, docs: list[EncodedDocument], start: int = 0):
        self.docs, self.i = docs, start

    def __call__(self):
        if self.i == len(self.docs):
            raise StopIteration
        self.i += 1
        return ["s", self.i - 1], self.docs[self.i - 1]

    def fetch(self, ref):
        return self.docs[ref[1]]


def pieces(batch):
    """(row, start slot, end slot, document number in the stream, first position) of each piece."""
    out, doc = [], -1
    for r in range(batch.input_ids.shape[0]):
        n = int(batch.lengths[r])
        starts = [t for t in range(n) if t == 0 or batch.doc_ids[r, t] != batch.doc_ids[r, t - 1]]
        for s, e in zip(starts, starts[1:] + [n]):
            p0 = int(batch.positions[r, s])
            doc += p0 == 0  # a piece starting past position 0 continues the previous document
            out.append((r, s, e, doc, p0))
    return out


def alone_targets(doc: EncodedDocument, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    tgt = torch.where(doc.loss_mask[s + 1 : e + 1], doc.ids[s + 1 : e + 1], IGNORE_INDEX)
    return tgt, doc.modality[s + 1 : e + 1] == IMAGE


def test_packed_forward_equals_each_document_alone():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    # 6 + 3 + 11 + 2 + 8 pairs fill 3 rows of 10 exactly; the third document spans rows 0 and 1.
    docs = [random_doc(n) for n in (7, 4, 12, 3, 9)]
    batch = Packer(10, PAD).next_batch(3, Stream(docs))
    layout = pieces(batch)
    assert [(r, s, e, d, p) for r, s, e, d, p in layout] == [
        (0, 0, 6, 0, 0), (0, 6, 9, 1, 0), (0, 9, 10, 2, 0), (1, 0, 10, 2, 1),
        (2, 0, 2, 3, 0), (2, 2, 10, 4, 0)]

    with torch.no_grad():
        h = model.hidden_states(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
        logits = model.output(h)
        packed = lm_loss_sums(h, model.output.weight, batch.targets, batch.image_targets)
        loss = ce_image = n = 0
        for r, s, e, d, p0 in layout:
            ids = docs[d].ids[p0 : p0 + e - s][None]
            # A first piece is the document's prefix alone; a continued piece starts at its position.
            alone_h = model.hidden_states(ids, positions=torch.arange(p0, p0 + e - s)[None])
            torch.testing.assert_close(logits[r, s:e], model.output(alone_h)[0], atol=1e-5, rtol=1e-5)
            if p0 == 0:
                torch.testing.assert_close(logits[r, s:e], model(ids)[0], atol=1e-5, rtol=1e-5)
            tgt, img = alone_targets(docs[d], p0, p0 + e - s)
            sums = lm_loss_sums(alone_h, model.output.weight, tgt[None], img[None])
            loss, ce_image, n = loss + sums.loss, ce_image + sums.ce_image, n + sums.n
    assert int(packed.n) == int(n) == batch.num_targets > 0
    torch.testing.assert_close(packed.loss, loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed.ce_image, ce_image, atol=1e-4, rtol=1e-5)


def test_packed_gradients_stay_within_documents():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg)
    batch = Packer(12, PAD).next_batch(1, Stream([random_doc(6), random_doc(8)]))
    emb = []
    model.tok_embeddings.register_forward_hook(lambda m, i, out: emb.append(out) or out.retain_grad())
    logits = model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
    logits[0, 7].sum().backward()
    grad = emb[0].grad[0].abs().sum(-1)
    assert torch.equal(batch.doc_ids[0], torch.tensor([0] * 5 + [1] * 7, dtype=torch.int32))
    assert (grad[5:8] > 0).all() and (grad[:5] == 0).all() and (grad[8:] == 0).all()


def test_packed_rows_are_full_and_every_target_appears_once():
    lengths = torch.randint(0, 26, (30,)).tolist() + [1, 0, 2]
    lengths += [2 + (4 - sum(max(n - 1, 0) for n in lengths)) % 8]  # the last row has 3 pad slots
    docs = numbered_docs(lengths)
    packer, stream, batches = Packer(8, PAD), Stream(docs), []
    while True:
        try:
            batches.append(packer.next_batch(3, stream))
        except StopIteration:
            break
    with pytest.raises(StopIteration):
        packer.next_batch(3, stream)
    for b in batches[:-1]:
        assert b.input_ids.shape == (3, 8) and b.num_pad == 0 and (b.doc_ids >= 0).all()
    real = [(b, r, int(b.lengths[r])) for b in batches for r in range(b.input_ids.shape[0])]
    inputs = torch.cat([b.input_ids[r, :n] for b, r, n in real])
    targets = torch.cat([b.targets[r, :n] for b, r, n in real])
    positions = torch.cat([b.positions[r, :n] for b, r, n in real])
    kept = [d for d in docs if len(d) >= 2]
    assert torch.equal(inputs, torch.cat([d.ids[:-1] for d in kept]))
    assert torch.equal(targets, torch.cat([d.ids[1:] for d in kept]))  # each once, in order
    assert torch.equal(positions, torch.cat([torch.arange(len(d) - 1) for d in kept]))
    for b in batches:
        assert b.doc_ids.dtype == torch.int32 and b.positions.dtype == torch.long
        assert (b.doc_ids[:, 0] == 0).all()
        new_doc = (b.positions[:, 1:] == 0).int()  # a row numbers its documents 0, 1, …
        real_BT = torch.arange(b.input_ids.shape[1]) < b.lengths[:, None]
        step = (b.doc_ids[:, 1:] - b.doc_ids[:, :-1])[real_BT[:, 1:]]
        assert torch.equal(step, new_doc[real_BT[:, 1:]])
    last = batches[-1]
    pad_BT = torch.arange(8) >= last.lengths[:, None]
    assert last.num_pad == int(pad_BT.sum()) == 3  # the stream's end is the only padding
    assert (last.doc_ids[pad_BT] == -1).all() and (last.input_ids[pad_BT] == PAD).all()
    assert (last.targets[pad_BT] == IGNORE_INDEX).all()


def test_padded_rows():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    docs = [random_doc(n) for n in (5, 21, 1, 0, 3)]  # 4 and 20 pairs, two skipped, 2 pairs
    packer, stream = Packer(8, PAD, mode="padded"), Stream(docs)
    first = packer.next_batch(3, stream)
    assert first.input_ids.shape == first.targets.shape == first.positions.shape == (3, 8)
    assert first.doc_ids is None and first.lengths.tolist() == [4, 8, 8] and first.num_pad == 4
    assert (first.input_ids[0, 4:] == PAD).all() and (first.targets[0, 4:] == IGNORE_INDEX).all()
    assert not first.image_targets[0, 4:].any()
    assert torch.equal(first.positions[2], torch.arange(8, 16))  # the long document goes on
    assert torch.equal(first.input_ids[2], docs[1].ids[8:16])
    tgt, img = alone_targets(docs[1], 8, 16)
    assert torch.equal(first.targets[2], tgt) and torch.equal(first.image_targets[2], img)
    with torch.no_grad():
        logits = model(first.input_ids, positions=first.positions)
        torch.testing.assert_close(logits[0, :4], model(docs[0].ids[None, :4])[0], atol=1e-5, rtol=1e-5)
    second = packer.next_batch(3, stream)  # the stream ends: fewer rows, as long as the longest
    assert second.input_ids.shape == (2, 4) and second.lengths.tolist() == [4, 2]
    assert torch.equal(second.input_ids[0], docs[1].ids[16:20])
    assert torch.equal(second.input_ids[1, :2], docs[4].ids[:2])
    with pytest.raises(StopIteration):
        packer.next_batch(3, stream)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_resume_gives_identical_batches(mode):
    lengths = [25, 3, 40, 1, 17, 30, 9, 50, 0, 12] + torch.randint(0, 30, (20,)).tolist()
    docs = [random_doc(n) for n in lengths]  # both modes stop mid-document after two batches
    packer, stream = Packer(16, PAD, mode=mode), Stream(docs)
    for _ in range(2):
        packer.next_batch(4, stream)
    state = json.loads(json.dumps(packer.state_dict()))
    assert state["carry"] is not None and state["carry"]["offset"] > 0
    resumed, resumed_stream = Packer(16, PAD, mode=mode), Stream(docs, start=stream.i)
    resumed.load_state_dict(state, resumed_stream.fetch)
    for _ in range(3):
        a, b = packer.next_batch(4, stream), resumed.next_batch(4, resumed_stream)
        for name in ("input_ids", "targets", "image_targets", "positions", "doc_ids", "lengths"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
    assert packer.state_dict() == resumed.state_dict()


def test_bad_input_is_refused_and_loses_nothing():
    with pytest.raises(ValueError, match="seq_len"):
        Packer(0, PAD)
    with pytest.raises(ValueError, match="mode"):
        Packer(8, PAD, mode="sorted")
    docs = [random_doc(12)]
    packer, stream = Packer(8, PAD), Stream(docs)
    with pytest.raises(ValueError, match="batch_size"):
        packer.next_batch(0, stream)
    packer.next_batch(1, stream)
    state = packer.state_dict()
    assert state == {"carry": {"ref": ["s", 0], "offset": 8}}
    bad = EncodedDocument(torch.arange(5), torch.zeros(4, dtype=torch.int8), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="one length"):
        packer.next_batch(1, Stream(docs + [bad], start=1))
    assert packer.state_dict() == state  # the carry's pairs were given back
    for broken in ({}, {"carry": {"ref": ["s", 0]}}, {"carry": {"ref": ["s", 0], "offset": 11}}):
        with pytest.raises(ValueError):
            packer.load_state_dict(broken, stream.fetch)
        assert packer.state_dict() == state
    odd = Packer(8, PAD)
    odd.next_batch(1, lambda: (object(), random_doc(12)))
    with pytest.raises(ValueError, match="JSON"):
        odd.state_dict()


def packed_example(cfg):
    """Two rows: three documents (one across the rows) and, at the end of row 1, two pad slots."""
    docs = [random_doc(n) for n in (9, 6, 10)]  # 8 + 5 + 9 = 22 pairs in 2 rows of 12
    batch = Packer(12, PAD).next_batch(2, Stream(docs))
    assert batch.num_pad == 2 and batch.doc_ids[1, -1] == -1
    return batch


def test_doc_ids_errors_and_pad_slots():
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    batch = packed_example(cfg)
    logits = model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
    assert torch.isfinite(logits).all()  # pad slots attend among themselves, never NaN
    with pytest.raises(ValueError, match="cache"):
        model(batch.input_ids, model.new_cache(2, 16), doc_ids=batch.doc_ids)
    with pytest.raises(ValueError, match="doc_ids"):
        model(batch.input_ids, doc_ids=batch.doc_ids[:, :5])
    with pytest.raises(ValueError, match="positions"):
        model(batch.input_ids, positions=batch.positions.float())


def flex_runs_on_cpu() -> str | None:
    """Why FlexAttention cannot run here, or None when it can."""
    if transformer.flex_attention is None:
        return "this torch has no FlexAttention"
    try:
        doc = torch.zeros(1, 4, dtype=torch.int32)
        q = torch.randn(1, 1, 4, 16)
        transformer._flex_attention(q, q, q, transformer.flex_document_mask(doc), False)
    except Exception as e:  # noqa: BLE001 (any failure means: not on this build)
        return f"FlexAttention does not run on CPU here: {e}"
    return None


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_sdpa_on_cpu(monkeypatch):
    if (reason := flex_runs_on_cpu()) is not None:
        pytest.skip(reason)
    cfg = ChameleonConfig.preset("tiny")
    model = Chameleon(cfg).eval()
    batch = packed_example(cfg)
    args = dict(positions=batch.positions, doc_ids=batch.doc_ids)
    calls = []
    real_flex = transformer._flex_attention
    with torch.no_grad():  # FlexAttention has no backward on CPU
        sdpa = model(batch.input_ids, **args)
        monkeypatch.setattr(transformer, "document_mask", transformer.flex_document_mask)
        monkeypatch.setattr(transformer, "_flex_attention", lambda *a: calls.append(1) or real_flex(*a))
        flex = model(batch.input_ids, **args)
    assert len(calls) == cfg.n_layers
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_attention_equals_sdpa_on_cuda(monkeypatch):
    if transformer.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    cfg = ChameleonConfig.preset("tiny", n_heads=2, n_kv_heads=1)  # head_dim 32
    model = Chameleon(cfg).cuda().eval()
    batch = packed_example(cfg)
    ids, pos, doc = batch.input_ids.cuda(), batch.positions.cuda(), batch.doc_ids.cuda()
    assert isinstance(transformer.document_mask(doc), transformer.BlockMask)
    with torch.no_grad():
        flex = model(ids, positions=pos, doc_ids=doc)
        monkeypatch.setattr(transformer, "document_mask", transformer.sdpa_document_mask)
        sdpa = model(ids, positions=pos, doc_ids=doc)
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=1e-4)


class Counting(EncodedDocument):
    """A document that counts how many of its tokens were read (sliced) by the packer."""

    def __init__(self, doc: EncodedDocument, reads: list):
        self._doc, self._reads = doc, reads

    @property
    def ids(self):
        return _Spy(self._doc.ids, self._reads)

    @property
    def modality(self):
        return self._doc.modality

    @property
    def loss_mask(self):
        return self._doc.loss_mask


class _Spy:
    def __init__(self, t, reads):
        self.t, self.reads = t, reads
        self.shape, self.ndim, self.dtype = t.shape, t.ndim, t.dtype

    def numel(self):
        return self.t.numel()

    def is_floating_point(self):
        return False

    def __getitem__(self, index):
        part = self.t[index]
        self.reads.append(part.numel())
        return part


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_a_ranks_rows_are_its_slice_of_the_whole_batch_and_only_they_are_read(mode):
    lengths = torch.randint(2, 40, (200,)).tolist()
    docs = [random_doc(n) for n in lengths]
    whole, stream = Packer(16, PAD, mode=mode), Stream(docs)
    shares = [(Packer(16, PAD, mode=mode), Stream(docs)) for _ in range(2)]
    for _ in range(4):
        full = whole.next_batch(8, stream)
        parts = [p.next_batch(8, s, slice(4 * r, 4 * r + 4)) for r, (p, s) in enumerate(shares)]
        assert torch.equal(torch.cat([b.lengths for b in parts]), full.lengths)
        rows = [(b, r) for b in parts for r in range(b.input_ids.shape[0])]  # padded: own longest row
        for i, (b, r) in enumerate(rows):
            n = int(b.lengths[r])
            for name in ("input_ids", "targets", "image_targets", "positions"):
                assert torch.equal(getattr(b, name)[r, :n], getattr(full, name)[i, :n]), name
        if mode == "packed":
            for name in ("positions", "doc_ids"):
                assert torch.equal(torch.cat([getattr(b, name) for b in parts]), getattr(full, name))
        assert all(p.state_dict() == whole.state_dict() for p, _ in shares)  # the stream state is global
    # Rank 0 of 2 reads about half of the tokens a single process reads.
    reads: list = []
    counted = [Counting(d, reads) for d in docs]
    Packer(16, PAD, mode="packed").next_batch(8, Stream(counted), slice(0, 4))
    assert 4 * 16 <= sum(reads) <= 4 * 16 + 40  # its 64 slots (+1 per piece), not the batch's 128
