"""A tiny character-level tokenizer with a chat template, and small paired datasets, for the trainer tests.

The tokenizer's ids fit the tiny models of `conftest.py` (vocabulary 96; pad 0, bos 1, eos 2). Plain text gets a BOS
token (like Llama tokenizers), chat messages are templated as `<s><|user|>...</s><|assistant|>`.
"""

from __future__ import annotations

from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:'-\néèàüöäßñç")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# (non-English prompt, answer, English prompt)
PAIRS = [
    ("Quelle est la capitale de la France ?", "Paris.", "What is the capital of France?"),
    ("Wie viele Beine hat eine Spinne?", "Acht.", "How many legs does a spider have?"),
    ("Qual é a cor do céu?", "Azul.", "What colour is the sky?"),
    ("Wer schrieb Faust?", "Goethe.", "Who wrote Faust?"),
    ("Combien font deux et deux ?", "Quatre.", "How much is two and two?"),
    ("Was trinken Kühe?", "Wasser.", "What do cows drink?"),
    ("Quel animal aboie ?", "Le chien.", "Which animal barks?"),
    ("Wie heißt die Hauptstadt von Italien?", "Rom.", "What is the capital of Italy?"),
    ("Quantos dias tem uma semana?", "Sete.", "How many days does a week have?"),
    ("De quelle couleur est la neige ?", "Blanche.", "What colour is snow?"),
    ("Welcher Planet ist rot?", "Der Mars.", "Which planet is red?"),
    ("Onde fica a Torre Eiffel?", "Em Paris.", "Where is the Eiffel Tower?"),
    ("Qui a peint la Joconde ?", "Léonard de Vinci.", "Who painted the Mona Lisa?"),
    ("Wie viele Monate hat ein Jahr?", "Zwölf.", "How many months does a year have?"),
    ("Qual é o maior oceano?", "O Pacífico.", "What is the largest ocean?"),
    ("Quelle langue parle-t-on au Brésil ?", "Le portugais.", "Which language is spoken in Brazil?"),
]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids < 87) with a chat template; plain text gets a BOS token."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def conversational_rows(pairs=PAIRS, english_field: str = "prompt_en") -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": answer}],
            english_field: [{"role": "user", "content": english}],
        }
        for prompt, answer, english in pairs
    ]


def plain_rows(pairs=PAIRS, english_field: str = "prompt_en") -> list[dict]:
    return [
        {"prompt": f"Q: {prompt}\nA:", "completion": f" {answer}", english_field: f"Q: {english}\nA:"}
        for prompt, answer, english in pairs
    ]


def conversational_dataset(n: int = len(PAIRS), **kwargs) -> Dataset:
    return Dataset.from_list(conversational_rows(PAIRS[:n], **kwargs))


def plain_dataset(n: int = len(PAIRS), **kwargs) -> Dataset:
    return Dataset.from_list(plain_rows(PAIRS[:n], **kwargs))
