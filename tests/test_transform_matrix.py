"""Fitting the Transform Matrix: agreement with numpy's lstsq, the solver, streaming, inputs, 4-bit, save/load."""

from __future__ import annotations

import math

import numpy as np
import peft
import pytest
import torch
from conftest import _COMMON, HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE, make_tiny_model
from helpers import ADAPTER, cc_config, cc_tuner, make_cc_model, randomize_lora_b
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import peft_cc.transform_matrix as transform_matrix_module
from peft_cc.transform_matrix import NormalEquations, fit_transform_matrix

# Tiny models (d=32) fitted on few pairs are underdetermined on purpose in several tests; one test checks the warning.
pytestmark = pytest.mark.filterwarnings("ignore:Fitting the .* Transform Matrix on only:UserWarning")

STATS_KEYS = {
    "num_pairs",
    "num_heldout_pairs",
    "num_rows",
    "num_heldout_rows",
    "num_skipped_pairs",
    "r2_heldout",
    "r2_train",
    "ridge",
    "ridge_relative",
    "hidden_size",
    "num_layers",
    "adapter_name",
    "seconds",
}


def _id_pairs(count, seed=0, max_len=10):
    """`count` pairs of random token-id prompts (1..max_len tokens each, ids in 1..VOCAB_SIZE-1)."""
    generator = torch.Generator().manual_seed(seed)

    def prompt():
        length = int(torch.randint(1, max_len + 1, (1,), generator=generator))
        return torch.randint(1, VOCAB_SIZE, (length,), generator=generator).tolist()

    return [(prompt(), prompt()) for _ in range(count)]


def _tiny_cc_model(dtype=torch.float32, seed=0):
    model = make_cc_model("llama", seed=seed, dtype=dtype, train=False)
    randomize_lora_b(model, seed=seed)
    return model


def _matrix(model):
    return cc_tuner(model).cc_transform_matrix[ADAPTER]


@pytest.fixture
def solutions(monkeypatch):
    """Records the float64 solution of every `NormalEquations.solve` call (before the cast to float32)."""
    recorded = []
    solve = NormalEquations.solve

    def recording_solve(self, ridge=transform_matrix_module.DEFAULT_RIDGE):
        transform, lam = solve(self, ridge)
        recorded.append(transform)
        return transform, lam

    monkeypatch.setattr(NormalEquations, "solve", recording_solve)
    return recorded


class CharTokenizer:
    """A minimal tokenizer with a chat template: one id per character (1..VOCAB_SIZE-1), special tokens marked.

    `tokenizer(text)` adds a BOS token (id 1) unless `add_special_tokens=False`, like real tokenizers do.
    """

    pad_token_id = 0
    bos_token_id = 1

    def encode_text(self, text):
        return [2 + ord(char) % (VOCAB_SIZE - 2) for char in text]

    def render(self, messages):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.bos_token_id] * add_special_tokens + self.encode_text(text)}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, return_dict=False):
        assert add_generation_prompt and tokenize and return_dict
        return {"input_ids": self.encode_text(self.render(messages))}


def _messages(text):
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------ 1. agreement with the reference

FRENCH_ENGLISH = [
    ("Quelle est la capitale de la France ?", "What is the capital of France?"),
    ("Combien de jours y a-t-il dans une semaine ?", "How many days are there in a week?"),
    ("Quel temps fait-il aujourd'hui ?", "What is the weather like today?"),
    ("Peux-tu m'aider à écrire une lettre ?", "Can you help me write a letter?"),
    ("Quelle est la couleur du ciel ?", "What color is the sky?"),
    ("Qui a écrit Les Misérables ?", "Who wrote Les Misérables?"),
    ("Donne-moi une recette de crêpes.", "Give me a recipe for pancakes."),
    ("Comment apprendre à programmer ?", "How do I learn to program?"),
    ("Quel est le plus grand océan du monde ?", "What is the largest ocean in the world?"),
    ("Traduis « bonjour » en anglais.", "Translate 'bonjour' into English."),
    ("Pourquoi les feuilles tombent-elles en automne ?", "Why do leaves fall in autumn?"),
    ("Combien font deux plus deux ?", "What is two plus two?"),
    ("Quelle heure est-il à Tokyo ?", "What time is it in Tokyo?"),
    ("Raconte-moi une blague.", "Tell me a joke."),
    ("Quels sont les bienfaits du sport ?", "What are the benefits of exercise?"),
    ("Où se trouve la tour Eiffel ?", "Where is the Eiffel Tower?"),
    ("Explique la photosynthèse simplement.", "Explain photosynthesis simply."),
    ("Quel est ton livre préféré ?", "What is your favorite book?"),
    ("Comment faire du pain ?", "How do you make bread?"),
    ("Quelle est la vitesse de la lumière ?", "What is the speed of light?"),
    ("Écris un poème sur la mer.", "Write a poem about the sea."),
    ("Qui était Napoléon ?", "Who was Napoleon?"),
    ("Comment dit-on merci en espagnol ?", "How do you say thank you in Spanish?"),
    ("Quel est le sens de la vie ?", "What is the meaning of life?"),
]


@pytest.mark.slow
def test_matches_numpy_lstsq_on_smollm2(smollm2_model, smollm2_tokenizer):
    """On real SmolLM2 activations (24 pairs × 30 layers = 720 rows > d=576), ridge=0 gives numpy's lstsq solution.

    The rows U, V are collected here independently, one unpadded prompt at a time, and solved with
    `numpy.linalg.lstsq` in float64, as the reference does. U is well conditioned enough here (cond ≈ 2e4) to
    compare T itself, not only the predictions U T.
    """
    model = peft.get_peft_model(smollm2_model, cc_config(r=4))
    randomize_lora_b(model, std=0.01)
    pairs = [(_messages(french), _messages(english)) for french, english in FRENCH_ENGLISH]
    stats = fit_transform_matrix(model, pairs, smollm2_tokenizer, ridge=0, holdout_fraction=0, show_progress=False)
    assert stats["num_pairs"] == 24 and stats["num_layers"] == 30 and stats["hidden_size"] == 576
    assert stats["num_rows"] == 720 and stats["ridge"] == 0.0 and stats["r2_heldout"] is None

    tuner = cc_tuner(model)

    def rows(messages):
        ids = smollm2_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            activations = tuner.anchor_activations(
                input_ids, torch.ones_like(input_ids), torch.arange(1), torch.tensor([len(ids) - 1]), list(range(30))
            )
        return activations[0].double().numpy()

    u = np.concatenate([rows(french) for french, _ in pairs])
    v = np.concatenate([rows(english) for _, english in pairs])
    reference, *_ = np.linalg.lstsq(u, v, rcond=None)
    fitted = _matrix(model).double().numpy()
    assert np.linalg.norm(fitted - reference) / np.linalg.norm(reference) < 1e-5
    assert np.linalg.norm(u @ fitted - u @ reference) / np.linalg.norm(u @ reference) < 1e-5
    r2 = 1 - ((u @ reference - v) ** 2).sum() / ((v - v.mean(axis=0)) ** 2).sum()
    assert math.isclose(stats["r2_train"], r2, rel_tol=1e-6)


# ------------------------------------------------------------------------------ 2. the solver on synthetic data


def _synthetic(rows, dim=16, seed=0, noise=1e-3):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    u *= torch.logspace(-1, 1, dim, dtype=torch.float64)  # columns of different scales, like FFN activations
    return u, noise * torch.randn(rows, dim, generator=generator, dtype=torch.float64)


def test_recovers_a_known_linear_map():
    """V = U T_true + noise: T_true is recovered, held-out R² ≈ 1, and a random T scores low."""
    dim = 16
    t_true = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, noise = _synthetic(2000, dim)
    fit = NormalEquations(dim)
    for start in range(0, 2000, 300):
        fit.add(u[start : start + 300], (u @ t_true + noise)[start : start + 300])
    transform, lam = fit.solve(ridge=0)
    assert lam == 0.0 and transform.dtype == torch.float64
    torch.testing.assert_close(transform, t_true, atol=1e-3, rtol=0)
    reference, *_ = np.linalg.lstsq(u.numpy(), (u @ t_true + noise).numpy(), rcond=None)
    np.testing.assert_allclose(transform.numpy(), reference, rtol=0, atol=1e-10)

    u_new, noise_new = _synthetic(500, dim, seed=2)
    heldout = NormalEquations(dim)
    heldout.add(u_new.float(), (u_new @ t_true + noise_new).float())  # float32 rows are accepted
    assert heldout.r_squared(transform) > 0.999
    random_transform = torch.randn(dim, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert heldout.r_squared(random_transform) < 0.1
    assert heldout.r_squared(torch.zeros(dim, dim)) <= 0.0  # predicting 0 is no better than the mean


def test_r_squared_matches_the_explicit_formula():
    u, _ = _synthetic(300, 8, seed=4)
    v = u @ torch.randn(8, 8, dtype=torch.float64) + 3.0 + torch.randn(300, 8, dtype=torch.float64)
    transform = torch.randn(8, 8, dtype=torch.float64)
    statistics = NormalEquations(8)
    statistics.add(u, v)
    residual = ((u @ transform - v) ** 2).sum()
    total = ((v - v.mean(dim=0)) ** 2).sum()
    assert math.isclose(statistics.residual_sum_of_squares(transform), float(residual), rel_tol=1e-10)
    assert math.isclose(statistics.total_sum_of_squares(), float(total), rel_tol=1e-10)
    assert math.isclose(statistics.r_squared(transform), float(1 - residual / total), rel_tol=1e-10)
    assert NormalEquations(8).r_squared(transform) is None  # no rows


def test_ridge_is_relative_to_the_mean_diagonal():
    u, noise = _synthetic(50, 8, seed=5)
    v = u + noise
    statistics = NormalEquations(8)
    statistics.add(u, v)
    transform, lam = statistics.solve(ridge=1e-2)
    gram = u.T @ u
    assert math.isclose(lam, 1e-2 * float(gram.trace()) / 8, rel_tol=1e-12)
    expected = torch.linalg.solve(gram + lam * torch.eye(8, dtype=torch.float64), u.T @ v)
    torch.testing.assert_close(transform, expected, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="ridge"):
        statistics.solve(ridge=-1.0)
    with pytest.raises(ValueError, match="no rows"):
        NormalEquations(8).solve()


def test_singular_system_gives_the_minimum_norm_solution():
    """Fewer rows than dimensions with ridge=0: numpy's lstsq (minimum-norm) solution, with a warning."""
    u, noise = _synthetic(5, 8, seed=6)
    v = u + noise
    statistics = NormalEquations(8)
    statistics.add(u, v)
    with pytest.warns(UserWarning, match="singular"):
        transform, _ = statistics.solve(ridge=0)
    reference, *_ = np.linalg.lstsq(u.numpy(), v.numpy(), rcond=None)
    np.testing.assert_allclose(transform.numpy(), reference, atol=1e-8)


# ------------------------------------------------------------------------------ 3. streaming


def test_accumulation_does_not_depend_on_chunking_and_keeps_no_rows():
    dim = 12
    u, noise = _synthetic(1000, dim, seed=7)
    v = u @ torch.randn(dim, dim, dtype=torch.float64) + noise
    solved = []
    for chunk in (1, 8, 1000):
        statistics = NormalEquations(dim)
        for start in range(0, 1000, chunk):
            statistics.add(u[start : start + chunk], v[start : start + chunk])
        solved.append(statistics.solve(ridge=1e-4)[0])
        # O(d²) memory: only d×d, d and scalar tensors are held, whatever the number of rows.
        shapes = {tuple(value.shape) for value in vars(statistics).values() if isinstance(value, torch.Tensor)}
        assert shapes == {(dim, dim), (dim,), ()} and statistics.num_rows == 1000
    for other in solved[1:]:
        assert (other - solved[0]).abs().max() < 1e-10


def test_fit_does_not_depend_on_batch_size(solutions):
    """batch_size 1 and 8 give the same float64 solution (float64 model: padding changes nothing) and statistics."""
    model = _tiny_cc_model(dtype=torch.float64)
    pairs = _id_pairs(30)
    first = fit_transform_matrix(model, pairs, batch_size=1, holdout_fraction=0.2, show_progress=False)
    matrix = _matrix(model).clone()
    second = fit_transform_matrix(model, pairs, batch_size=8, holdout_fraction=0.2, show_progress=False)
    assert len(solutions) == 2
    assert (solutions[0] - solutions[1]).abs().max() < 1e-10
    torch.testing.assert_close(_matrix(model), matrix, atol=1e-6, rtol=0)
    assert math.isclose(first["r2_heldout"], second["r2_heldout"], rel_tol=1e-9)
    assert first.keys() == second.keys()
    for key in first.keys() - {"seconds"}:  # numbers to 1e-9; names (the adapter's) exactly
        if isinstance(first[key], str):
            assert first[key] == second[key], key
        else:
            assert first[key] == pytest.approx(second[key], rel=1e-9), key


def test_fit_keeps_only_d_by_d_statistics(monkeypatch):
    """The fit's accumulators hold d×d statistics only: no list of rows grows with the number of pairs."""
    created = []
    original_init = NormalEquations.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(NormalEquations, "__init__", recording_init)
    fit_transform_matrix(_tiny_cc_model(), _id_pairs(40), holdout_fraction=0.25, show_progress=False)
    assert len(created) == 2  # the fit and the held-out evaluator
    for statistics in created:
        for value in vars(statistics).values():
            assert isinstance(value, (torch.Tensor, int))
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float64 and all(size == HIDDEN_SIZE for size in value.shape)
    assert created[0].num_rows == 30 * NUM_LAYERS and created[1].num_rows == 10 * NUM_LAYERS


# ------------------------------------------------------------------------------ 4. inputs and statistics


def test_messages_strings_and_ids_give_the_same_matrix():
    tokenizer = CharTokenizer()
    model = _tiny_cc_model()
    texts = [(f"Question numéro {i} ?", f"Question number {i}?" * (1 + i % 3)) for i in range(12)]
    as_messages = [(_messages(a), _messages(b)) for a, b in texts]
    as_strings = [(tokenizer.render(a), tokenizer.render(b)) for a, b in as_messages]
    as_ids = [(tokenizer.encode_text(a), tokenizer.encode_text(b)) for a, b in as_strings]
    as_tensors = [(torch.tensor(a), tuple(b)) for a, b in as_ids]
    matrices = []
    for pairs in (as_messages, as_strings, as_ids, as_tensors):
        fit_transform_matrix(model, pairs, tokenizer, holdout_fraction=0, show_progress=False)
        matrices.append(_matrix(model).clone())
    assert matrices[0].abs().sum() > 0
    for matrix in matrices[1:]:
        torch.testing.assert_close(matrix, matrices[0], atol=1e-6, rtol=1e-5)
    # Text is the already templated prompt: tokenizing it with special tokens would change the activations.
    with_bos = [([1, *a], [1, *b]) for a, b in as_ids]
    fit_transform_matrix(model, with_bos, holdout_fraction=0, show_progress=False)
    assert not torch.allclose(_matrix(model), matrices[0], atol=1e-4)


def test_generator_and_max_pairs():
    """A generator is read lazily: max_pairs items are taken from it, no more."""
    model = _tiny_cc_model()
    pairs = _id_pairs(20)
    read = []

    def stream():
        for pair in pairs:
            read.append(pair)
            yield pair

    stats = fit_transform_matrix(model, stream(), max_pairs=7, batch_size=3, holdout_fraction=0, show_progress=False)
    assert len(read) == 7
    assert stats["num_pairs"] == 7 and stats["num_rows"] == 7 * NUM_LAYERS
    from_stream = _matrix(model).clone()
    fit_transform_matrix(model, pairs[:7], holdout_fraction=0, show_progress=False)
    torch.testing.assert_close(_matrix(model), from_stream, atol=1e-6, rtol=1e-5)
    # A list longer than max_pairs, and max_pairs=0 (nothing to fit).
    assert fit_transform_matrix(model, pairs, max_pairs=7, holdout_fraction=0, show_progress=False)["num_pairs"] == 7
    with pytest.raises(ValueError, match="No pair"):
        fit_transform_matrix(model, pairs, max_pairs=0, show_progress=False)


def test_statistics_and_skipped_pairs():
    tokenizer = CharTokenizer()
    model = _tiny_cc_model()
    pairs = _id_pairs(20)
    pairs[3] = ([], pairs[3][1])
    pairs[8] = (pairs[8][0], "")
    pairs[11] = ([], [])
    stats = fit_transform_matrix(model, pairs, tokenizer, holdout_fraction=0.1, show_progress=False)
    assert set(stats) == STATS_KEYS
    assert stats["num_skipped_pairs"] == 3
    assert stats["num_heldout_pairs"] + stats["num_pairs"] + stats["num_skipped_pairs"] == 20
    assert stats["num_heldout_pairs"] in (1, 2)  # 2 of 20 pair indices are held out; one may be a skipped pair
    assert stats["num_rows"] == stats["num_pairs"] * NUM_LAYERS
    assert stats["num_heldout_rows"] == stats["num_heldout_pairs"] * NUM_LAYERS
    assert isinstance(stats["r2_heldout"], float) and isinstance(stats["r2_train"], float)
    assert stats["hidden_size"] == HIDDEN_SIZE and stats["num_layers"] == NUM_LAYERS
    assert stats["adapter_name"] == ADAPTER and stats["seconds"] > 0
    assert stats["ridge_relative"] == 1e-4 and stats["ridge"] > 0
    assert torch.isfinite(_matrix(model)).all() and _matrix(model).abs().sum() > 0


def test_heldout_split():
    model = _tiny_cc_model()
    pairs = _id_pairs(20)

    def fit(data, **kwargs):
        return fit_transform_matrix(model, data, show_progress=False, **kwargs)

    assert fit(pairs)["num_heldout_pairs"] == 2  # default 10 %
    assert fit(pairs, holdout_fraction=0.5)["num_heldout_pairs"] == 10
    assert fit(pairs[:2])["num_heldout_pairs"] == 1  # at least one held out when there are >= 2 pairs
    with pytest.warns(UserWarning, match="underdetermined"):  # 1 pair × 3 layers < d = 32
        single = fit(pairs[:1])
    assert single["num_heldout_pairs"] == 0 and single["r2_heldout"] is None
    none = fit(pairs, holdout_fraction=0)
    assert none["num_pairs"] == 20 and none["r2_heldout"] is None
    # Seeded: the same seed gives the same split and matrix, another seed another split.
    first, matrix = fit(pairs, seed=1), _matrix(model).clone()
    assert fit(pairs, seed=1)["r2_heldout"] == first["r2_heldout"] and torch.equal(_matrix(model), matrix)
    assert fit(pairs, seed=2)["r2_heldout"] != first["r2_heldout"]
    # A stream of unknown length: an independent seeded draw per pair.
    streamed = [fit(iter(pairs), holdout_fraction=0.5, seed=seed)["num_heldout_pairs"] for seed in range(3)]
    assert all(0 < count < 20 for count in streamed) and len(set(streamed)) > 1


def test_invalid_inputs():
    model = _tiny_cc_model()
    good = _id_pairs(3)
    matrix = _matrix(model).clone()
    with pytest.raises(ValueError, match="tokenizer"):
        fit_transform_matrix(model, [(_messages("bonjour"), _messages("hello"))], show_progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        fit_transform_matrix(model, [("bonjour", "hello")], show_progress=False)
    with pytest.raises(TypeError, match="pair 2 .non-English"):
        fit_transform_matrix(model, [*good[:2], (3.5, [1, 2])], show_progress=False)
    with pytest.raises(TypeError, match="pair 1 .English"):
        fit_transform_matrix(model, [good[0], ([1, 2], [1, "a"])], show_progress=False)
    with pytest.raises(ValueError, match="Pair 1 "):
        fit_transform_matrix(model, [good[0], ([1, 2], [3], [4])], show_progress=False)
    with pytest.raises(ValueError, match="role"):
        fit_transform_matrix(model, [([{"text": "hi"}], [1])], CharTokenizer(), show_progress=False)
    with pytest.raises(ValueError, match="No pair"):
        fit_transform_matrix(model, [([], [1, 2]), ([3], "")], CharTokenizer(), show_progress=False)
    for bad in (dict(batch_size=0), dict(ridge=-1.0), dict(holdout_fraction=1.0), dict(max_pairs=-1)):
        with pytest.raises(ValueError):
            fit_transform_matrix(model, good, show_progress=False, **bad)
    with pytest.raises(ValueError, match="CC-Tuning model"):
        fit_transform_matrix(make_tiny_model("llama"), good, show_progress=False)
    with pytest.raises(ValueError, match="Unknown CC-Tuning adapter"):
        fit_transform_matrix(model, good, adapter_name="other", show_progress=False)
    assert torch.equal(_matrix(model), matrix)  # nothing was stored by a failed fit


def test_accepts_the_tuner_restores_modes_and_fits_the_named_adapter():
    model = _tiny_cc_model()
    model.train()
    tuner = cc_tuner(model)
    tuner.model.lm_head.eval()  # a submodule in its own mode keeps it
    stats = fit_transform_matrix(tuner, _id_pairs(10), show_progress=False, adapter_name=ADAPTER)
    assert stats["adapter_name"] == ADAPTER
    assert model.training and tuner.model.model.layers[0].training and not tuner.model.lm_head.training
    assert _matrix(model).abs().sum() > 0 and not _matrix(model).requires_grad

    model.add_adapter("second", cc_config())
    with pytest.raises(ValueError, match="set_adapter"):  # "second" is not the active adapter
        fit_transform_matrix(model, _id_pairs(10), adapter_name="second", show_progress=False)
    model.set_adapter("second")
    fit_transform_matrix(model, _id_pairs(10), show_progress=False)
    assert tuner.cc_transform_matrix["second"].abs().sum() > 0


def test_fits_every_architecture(architecture):
    model = make_cc_model(architecture, train=False)
    stats = fit_transform_matrix(model, _id_pairs(12), show_progress=False)
    assert stats["num_rows"] == stats["num_pairs"] * NUM_LAYERS
    assert torch.isfinite(_matrix(model)).all() and _matrix(model).abs().sum() > 0


@pytest.mark.slow
def test_real_chat_template_messages_strings_and_ids(smollm2_tokenizer):
    """With SmolLM2's real chat template: messages, templated text and token ids give the same matrix."""
    tokenizer = smollm2_tokenizer
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**_COMMON, "vocab_size": len(tokenizer), "pad_token_id": 2})).eval()
    model = make_cc_model("llama", base=base, train=False)
    as_messages = [(_messages(a), _messages(b)) for a, b in FRENCH_ENGLISH[:10]]
    as_strings = [
        tuple(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in pair)
        for pair in as_messages
    ]
    as_ids = [
        tuple(
            tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for m in pair
        )
        for pair in as_messages
    ]
    matrices = []
    for pairs in (as_messages, as_strings, as_ids):
        fit_transform_matrix(model, pairs, tokenizer, holdout_fraction=0, show_progress=False)
        matrices.append(_matrix(model).clone())
    for matrix in matrices[1:]:
        torch.testing.assert_close(matrix, matrices[0], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ 5. 4-bit and bfloat16


def test_fits_a_4bit_model(tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**_COMMON, "hidden_size": 64, "intermediate_size": 128})).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    model = peft.get_peft_model(base, cc_config())
    assert isinstance(base.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    stats = fit_transform_matrix(model, _id_pairs(30), show_progress=False)  # 27 pairs × 3 layers > d = 64
    matrix = _matrix(model)
    assert matrix.dtype == torch.float32 and matrix.shape == (64, 64)
    assert torch.isfinite(matrix).all() and matrix.abs().sum() > 0
    assert stats["hidden_size"] == 64 and math.isfinite(stats["r2_heldout"])


def test_fits_a_bfloat16_model():
    """bf16 activations are accumulated in float64; the fit is close to the float32 model's."""
    pairs = _id_pairs(30)
    float_model = _tiny_cc_model()
    float_stats = fit_transform_matrix(float_model, pairs, holdout_fraction=0, show_progress=False)
    bf16_model = _tiny_cc_model(dtype=torch.bfloat16)
    stats = fit_transform_matrix(bf16_model, pairs, holdout_fraction=0, show_progress=False)
    matrix = _matrix(bf16_model)
    assert matrix.dtype == torch.float32 and torch.isfinite(matrix).all()
    assert (matrix - _matrix(float_model)).norm() / _matrix(float_model).norm() < 0.1
    assert math.isclose(stats["r2_train"], float_stats["r2_train"], abs_tol=0.02)


# ------------------------------------------------------------------------------ 6. save and load


def test_fitted_matrix_round_trips(tmp_path):
    model = _tiny_cc_model()
    fit_transform_matrix(model, _id_pairs(20), show_progress=False)
    fitted = _matrix(model).clone()
    assert fitted.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    assert torch.equal(_matrix(loaded), fitted)
