"""The demo model's training corpus and held-out questions, defined once.

``examples/train_demo_model.py`` trains on :func:`training_conversations`; the tests ask
:func:`held_out_questions`, whose operand pairs never occur in training (in any order or
wording). Everything here is deterministic: fixed seeds, ``zlib.crc32`` for the hold-out rule,
no dependence on hash randomisation.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator

Message = dict[str, str]
Conversation = list[Message]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in MiniMind

# ChatML as in MiniMind's tokenizer_config.json, without a default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MAX_OPERAND = 99  # arithmetic uses whole numbers 0..99
HOLD_OUT_EVERY = 20  # about 1 unordered operand pair in 20 is never trained on
CORPUS_SEED = 1234
QUESTION_SEED = 4321

ADD_PHRASES = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "what's {a}+{b}?",
    "Calculate {a} + {b}.",
    "{a} + {b} = ?",
    "{a}+{b}",
    "How much is {a} plus {b}?",
    "Add {a} and {b}.",
    "Please add {a} to {b}.",
    "What do you get if you add {a} and {b}?",
    "What is the sum of {a} and {b}?",
    "Compute {a} + {b}",
    "{a}加{b}等于多少？",
    "{a}加{b}是多少",
    "计算 {a} + {b}",
    "请算一下{a}+{b}",
    "{a}和{b}的和是多少？",
)
SUB_PHRASES = (
    "What is {a} - {b}?",
    "What is {a} minus {b}?",
    "what's {a}-{b}?",
    "Calculate {a} - {b}.",
    "{a} - {b} = ?",
    "{a}-{b}",
    "How much is {a} minus {b}?",
    "Subtract {b} from {a}.",
    "Take {b} away from {a}.",
    "What do you get if you subtract {b} from {a}?",
    "What is the difference between {a} and {b}?",
    "Compute {a} - {b}",
    "{a}减{b}等于多少？",
    "{a}减去{b}是多少",
    "计算 {a} - {b}",
    "请算一下{a}-{b}",
)

IDENTITY_EN = ("I am MiniMind demo, a tiny demo model trained in a few minutes "
               "on a CPU to show how minimind-core works. I can greet you, do additions and "
               "subtractions of numbers up to 99, and answer a few simple facts. I am not a real "
               "MiniMind model.")
IDENTITY_ZH = ("我是 MiniMind 演示模型，一个在 CPU 上训练了几分钟的很小的演示模型，用来展示 minimind-core "
               "的用法。我会打招呼、做 99 以内的加减法、回答一些简单的常识问题。我不是真正的 MiniMind 模型。")
WHO_EN = ("Who are you?", "who are you", "What are you?", "Introduce yourself.",
          "Tell me about yourself.", "What is your name?", "What's your name?",
          "Are you MiniMind?", "What can you do?", "Are you a real model?")
WHO_ZH = ("你是谁？", "你是谁", "你叫什么名字？", "介绍一下你自己。", "请介绍一下你自己",
          "你能做什么？", "你是什么模型？", "你是MiniMind吗？")

GREET_EN = ("Hello", "hello", "Hi", "hi", "Hi!", "Hello!", "Hey", "hey there",
            "Good morning", "Good afternoon", "Good evening", "Hello, how are you?",
            "How are you?", "Nice to meet you")
GREET_EN_REPLY = "Hello! I am MiniMind demo, a tiny demo model. Ask me a simple sum like 12 + 34, or a simple fact."
GREET_ZH = ("你好", "你好！", "您好", "嗨", "早上好", "晚上好", "你好吗？", "很高兴认识你")
GREET_ZH_REPLY = "你好！我是 MiniMind 演示模型。你可以问我简单的加减法，比如 12 + 34，或者简单的常识问题。"

SMALL_TALK = (
    (("Thank you", "Thanks!", "thanks", "Thank you very much."),
     "You're welcome!"),
    (("谢谢", "谢谢你！", "多谢"), "不客气！"),
    (("Bye", "Goodbye", "See you later", "bye!"), "Goodbye! Have a nice day."),
    (("再见", "拜拜", "下次见"), "再见，祝你今天愉快！"),
)

# Questions outside what the demo knows get one honest answer.
FALLBACK_EN = ("Sorry, I am only a tiny demo model: I know greetings, additions and subtractions "
               "of numbers up to 99, and a few simple facts.")
FALLBACK_ZH = "抱歉，我只是一个很小的演示模型：我只会打招呼、99 以内的加减法和一些简单的常识。"
_TOPICS_EN = ("quantum physics", "the stock market", "my homework", "Python decorators",
              "the meaning of life", "black holes", "French cooking", "machine learning",
              "the weather tomorrow", "a good book", "World War II", "climate change",
              "how to fix my car", "the best phone", "love", "music theory")
_ASK_EN = ("Tell me about {t}.", "Explain {t}.", "What do you think about {t}?",
           "Can you help me with {t}?", "Write a poem about {t}.", "I have a question about {t}.")
_OTHER_EN = ("Tell me a joke", "Tell me a story.", "What time is it?", "Translate this into French.",
             "Write some code for me", "Who won the game yesterday?", "Can you search the web?",
             "Summarize this article.", "What should I eat tonight?", "Do you have feelings?")
_OTHER_ZH = ("讲个笑话", "给我讲个故事。", "现在几点了？", "帮我翻译成英文", "今天吃什么？", "你有感情吗？")
TOO_BIG_EN = "Sorry, I can only add and subtract whole numbers from 0 to 99."
TOO_BIG_ZH = "抱歉，我只会 0 到 99 之间的整数加减法。"
_TOPICS_ZH = ("量子物理", "股票", "我的作业", "人生的意义", "黑洞", "做饭", "机器学习",
              "明天的天气", "历史", "音乐", "写代码", "旅游")
_ASK_ZH = ("给我讲讲{t}。", "解释一下{t}", "你怎么看{t}？", "能帮我处理{t}吗？", "写一首关于{t}的诗")

# (English question forms, English answer, Chinese question forms, Chinese answer)
CAPITALS = (
    ("France", "Paris", "法国", "巴黎"), ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
    ("the United Kingdom", "London", "英国", "伦敦"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("India", "New Delhi", "印度", "新德里"),
    ("Brazil", "Brasilia", "巴西", "巴西利亚"), ("the United States", "Washington, D.C.", "美国", "华盛顿"),
    ("South Korea", "Seoul", "韩国", "首尔"), ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
)
COLORS = (
    ("the sky", "blue", "天空", "蓝色"), ("grass", "green", "草", "绿色"),
    ("snow", "white", "雪", "白色"), ("a banana", "yellow", "香蕉", "黄色"),
    ("a strawberry", "red", "草莓", "红色"), ("coal", "black", "煤", "黑色"),
    ("an orange", "orange", "橙子", "橙色"), ("milk", "white", "牛奶", "白色"),
)
OTHER_FACTS = (
    (("How many days are in a week?", "How many days does a week have?"),
     "A week has 7 days.", ("一周有几天？", "一个星期有多少天？"), "一周有 7 天。"),
    (("How many months are in a year?", "How many months does a year have?"),
     "A year has 12 months.", ("一年有几个月？", "一年有多少个月？"), "一年有 12 个月。"),
    (("How many legs does a spider have?",), "A spider has 8 legs.",
     ("蜘蛛有几条腿？",), "蜘蛛有 8 条腿。"),
    (("How many legs does a dog have?",), "A dog has 4 legs.", ("狗有几条腿？",), "狗有 4 条腿。"),
    (("What is the largest planet?", "Which planet is the biggest?"),
     "Jupiter is the largest planet in the solar system.",
     ("最大的行星是哪个？", "太阳系最大的行星是什么？"), "木星是太阳系中最大的行星。"),
    (("What is the boiling point of water?", "At what temperature does water boil?"),
     "Water boils at 100 degrees Celsius at sea level.",
     ("水的沸点是多少？", "水在多少度沸腾？"), "在海平面上，水在 100 摄氏度沸腾。"),
    (("What is the freezing point of water?", "At what temperature does water freeze?"),
     "Water freezes at 0 degrees Celsius.", ("水的冰点是多少？", "水在多少度结冰？"), "水在 0 摄氏度结冰。"),
    (("What is the highest mountain?", "Which mountain is the tallest in the world?"),
     "Mount Everest is the highest mountain in the world.",
     ("世界上最高的山是哪座？", "最高的山是什么？"), "珠穆朗玛峰是世界上最高的山。"),
    (("What language is spoken in Brazil?",), "People in Brazil speak Portuguese.",
     ("巴西人说什么语言？",), "巴西人说葡萄牙语。"),
    (("What do bees make?",), "Bees make honey.", ("蜜蜂会制造什么？",), "蜜蜂会酿蜂蜜。"),
)
_CAPITAL_EN = ("What is the capital of {x}?", "What's the capital of {x}?",
               "Tell me the capital of {x}.", "capital of {x}?", "Which city is the capital of {x}?")
_CAPITAL_ZH = ("{x}的首都是哪里？", "{x}的首都是什么？", "{x}首都")
_COLOR_EN = ("What color is {x}?", "What colour is {x}?", "Which color is {x}?")
_COLOR_ZH = ("{x}是什么颜色的？", "{x}是什么颜色")
_SYSTEMS = ("You are a helpful assistant.", "You are MiniMind demo.", "你是一个有用的助手。",
            "Answer briefly.")


# -- the chat format ------------------------------------------------------------------------

def render(messages: Conversation, add_generation_prompt: bool = False) -> str:
    """What :data:`CHAT_TEMPLATE` renders, in plain Python (the training script tokenizes this)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


# -- arithmetic ----------------------------------------------------------------------------

def is_held_out(op: str, a: int, b: int) -> bool:
    """True for operand pairs kept out of training (either order, every wording)."""
    lo, hi = sorted((a, b))
    return zlib.crc32(f"{op}:{lo},{hi}".encode()) % HOLD_OUT_EVERY == 0


def arithmetic_answer(op: str, a: int, b: int) -> str:
    """The exact reply the demo gives: column arithmetic worked digit by digit, then the result.

    ``47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8. So 47 + 38 = 85.`` Writing the units first and
    the carry out lets a tiny model learn sums it never saw; single digits are answered directly
    (``3 + 4 = 7``).
    """
    result = a + b if op == "+" else a - b
    equation = f"{a} {op} {b} = {result}"
    if a < 10 and b < 10:
        return equation
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        carry = a0 + b0 >= 10
        units = f"{a0} + {b0} = {a0 + b0}" + (", carry 1" if carry else "")
        terms = [a1] * (a >= 10) + [b1] * (b >= 10) + [1] * carry
        tens = " + ".join(map(str, terms)) + f" = {sum(terms)}"
    else:  # a >= b
        borrow = a0 < b0
        units = (f"1{a0} - {b0} = {10 + a0 - b0}, borrow 1" if borrow
                 else f"{a0} - {b0} = {a0 - b0}")
        terms = [a1] + [1] * borrow + [b1] * (b >= 10)
        tens = " - ".join(map(str, terms)) + f" = {terms[0] - sum(terms[1:])}"
    steps = units + (f"; {tens}" if len(terms) > 1 else "")  # one term: the tens digit is kept
    return f"{a} {op} {b}: {steps}. So {equation}."


def arithmetic_pairs(op: str, held_out: bool) -> list[tuple[int, int]]:
    """All (a, b) of one operation (subtraction keeps a >= b), held-out ones or training ones."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
             if op == "+" or a >= b]
    return [p for p in pairs if is_held_out(op, *p) == held_out]


def _arithmetic_question(rng: random.Random, op: str, a: int, b: int) -> str:
    return rng.choice(ADD_PHRASES if op == "+" else SUB_PHRASES).format(a=a, b=b)


def held_out_questions() -> list[tuple[str, str]]:
    """(question, exact expected reply) for every held-out pair, additions then subtractions."""
    rng = random.Random(QUESTION_SEED)
    out = []
    for op in "+-":
        for a, b in arithmetic_pairs(op, held_out=True):
            out.append((_arithmetic_question(rng, op, a, b), arithmetic_answer(op, a, b)))
    return out


# -- the training corpus ---------------------------------------------------------------------

def _facts() -> list[tuple[str, str]]:
    qa: list[tuple[str, str]] = []
    for en, en_a, zh, zh_a in CAPITALS:
        qa += [(q.format(x=en), f"The capital of {en} is {en_a}.") for q in _CAPITAL_EN]
        qa += [(q.format(x=zh), f"{zh}的首都是{zh_a}。") for q in _CAPITAL_ZH]
    for en, en_a, zh, zh_a in COLORS:
        answer = f"{en[0].upper() + en[1:]} is {en_a}."
        qa += [(q.format(x=en), answer) for q in _COLOR_EN]
        qa += [(q.format(x=zh), f"{zh}是{zh_a}的。") for q in _COLOR_ZH]
    for en_qs, en_a, zh_qs, zh_a in OTHER_FACTS:
        qa += [(q, en_a) for q in en_qs] + [(q, zh_a) for q in zh_qs]
    return qa


def _chat_turns() -> list[tuple[list[tuple[str, str]], int]]:
    """Groups of (question, reply) with how often each is repeated per corpus copy.

    Short chat turns are few, so they are repeated more; the catch-all fallback less, so that it
    does not swallow greetings.
    """
    identity = [(q, IDENTITY_EN) for q in WHO_EN] + [(q, IDENTITY_ZH) for q in WHO_ZH]
    greetings = [(q, GREET_EN_REPLY) for q in GREET_EN] + [(q, GREET_ZH_REPLY) for q in GREET_ZH]
    small_talk = [(q, answer) for questions, answer in SMALL_TALK for q in questions]
    fallback = ([(a.format(t=t), FALLBACK_EN) for t in _TOPICS_EN for a in _ASK_EN]
                + [(a.format(t=t), FALLBACK_ZH) for t in _TOPICS_ZH for a in _ASK_ZH]
                + [(q, FALLBACK_EN) for q in _OTHER_EN] + [(q, FALLBACK_ZH) for q in _OTHER_ZH])
    return [(identity, 6), (greetings, 6), (small_talk, 4), (_facts(), 2), (fallback, 1)]


def _too_big(rng: random.Random, n: int = 400) -> list[tuple[str, str]]:
    """Sums with an operand of 100..999 get an honest refusal instead of a wrong answer."""
    out = []
    for _ in range(n):
        op = rng.choice("+-")
        big, other = rng.randint(100, 999), rng.randint(0, 999)
        a, b = (big, other) if rng.random() < 0.5 else (other, big)
        if op == "-" and a < b:
            a, b = b, a
        q = _arithmetic_question(rng, op, a, b)
        out.append((q, TOO_BIG_ZH if any("\u4e00" <= ch <= "\u9fff" for ch in q) else TOO_BIG_EN))
    return out


def _single(q: str, a: str) -> Conversation:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def training_conversations(seed: int = CORPUS_SEED, arithmetic_copies: int = 2,
                           chat_copies: int = 3) -> list[Conversation]:
    """The whole training corpus, shuffled; the same list for the same arguments.

    Every training operand pair appears ``arithmetic_copies`` times, each in a randomly chosen
    wording; facts and chat turns ``chat_copies`` times (short chat turns more often). A few conversations carry a system
    prompt or two turns, so multi-turn chat and ``--system`` stay in distribution.
    """
    rng = random.Random(seed)
    convs: list[Conversation] = []
    for op in "+-":
        pairs = arithmetic_pairs(op, held_out=False)
        for _ in range(arithmetic_copies):
            convs += [_single(_arithmetic_question(rng, op, a, b), arithmetic_answer(op, a, b))
                      for a, b in pairs]
    groups = _chat_turns() + [(_too_big(rng), 1)]
    for group, repeat in groups:
        convs += [_single(q, a) for q, a in group] * (repeat * chat_copies)
    qa = [pair for group, repeat in groups for pair in group * repeat]
    for conv in _extras(rng, qa, n=len(convs) // 10):
        convs.append(conv)
    rng.shuffle(convs)
    return convs


def _extras(rng: random.Random, qa: list[tuple[str, str]], n: int) -> Iterator[Conversation]:
    """System prompts and two-turn conversations mixing chat, facts and arithmetic."""
    train_add = arithmetic_pairs("+", held_out=False)
    train_sub = arithmetic_pairs("-", held_out=False)

    def any_turn() -> tuple[str, str]:
        if rng.random() < 0.5:
            return rng.choice(qa)
        op = rng.choice("+-")
        a, b = rng.choice(train_add if op == "+" else train_sub)
        return _arithmetic_question(rng, op, a, b), arithmetic_answer(op, a, b)

    for _ in range(n):
        conv: Conversation = []
        if rng.random() < 0.4:
            conv.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        for _ in range(rng.choice((1, 2, 2))):
            q, a = any_turn()
            conv += _single(q, a)
        yield conv
