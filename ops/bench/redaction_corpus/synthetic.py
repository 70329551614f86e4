"""The synthetic corpus: prose (Python docs paragraphs and business sentences) with PII
sentences spliced in, names from 17 faker locales, phones from `phonenumbers` examples in
national and international formats, card formats Presidio misses, secrets by provider.
Labels come from the generator: it records where it inserted each value."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import string
import uuid
import zlib

from ops.bench.redaction_corpus.labels import Sample, SpanBuilder

NAME_LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "nl_NL", "pl_PL", "en_IN",
                "tr_TR", "sv_SE", "cs_CZ", "yo_NG", "vi_VN", "ja_JP", "zh_CN"]
IBAN_LOCALES = ["de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pl_PL", "en_GB", "pt_PT", "fi_FI", "no_NO"]
# National formats only where a reader can tell the country (Presidio's and our default
# regions); everything else is written internationally (+CC).
NATIONAL_REGIONS = ["US", "GB", "DE", "FR", "IN", "BR", "ES", "IT", "NL", "AU", "CA"]
INTERNATIONAL_ONLY = ["PL", "SE", "MX", "JP", "NG", "ZA", "CH", "AT", "IE", "SG", "AR"]

TASKS = [
    "Summarise the following text in three bullet points.", "Translate this paragraph into German.",
    "Explain what this code does and suggest improvements.", "Draft a polite reply to the message below.",
    "Rewrite this for a non-technical audience.", "Find the bug in the snippet below.",
    "Write unit tests for the function described here.", "Classify the sentiment of this review.",
    "Extract the action items from these meeting notes.", "Turn these notes into a short status update.",
]
BUSINESS = [
    "Revenue grew {pct}% quarter over quarter to ${amount} in Q{q} {year}.",
    "Order #{order} shipped on {date} and should arrive within {n} business days.",
    "The deployment of version {ver} is scheduled for {date} at {time} UTC.",
    "Ticket OPS-{n4} tracks the latency regression seen after commit {sha}.",
    "Our New York and San Francisco offices will close early on Friday for the holiday.",
    "The Amazon Web Services bill rose {pct}% after we enabled cross-region replication.",
    "Request {uuid} failed with status 503 after {n} retries.",
    "Please review the Pull Request before the Monday standup; the CI pipeline is green.",
    "Set the PASSWORD environment variable before running the migration script.",
    "The service listens on localhost:{port} and talks to Redis at 127.0.0.1:6379.",
    "Use the Visual Studio Code extension or the JetBrains plugin, whichever your team prefers.",
    "In March the Berlin team migrated {n} dashboards from Grafana to the new Looker instance.",
    "Average handling time dropped from {n} to {n2} minutes after the new triage rules.",
    "The invoice total of EUR {amount} includes VAT at {pct}%.",
    "Store the API key in the secrets manager, never in the repository.",
    "Model gpt-4o-mini answered {n} of {n2} evaluation questions correctly ({pct}%).",
    "The Board approved the budget for the Customer Success and Data Platform teams.",
    "Use ISO 8601 timestamps such as {date}T{time}Z in every log line.",
    "Checksum sha256:{sha}{sha} matches the published release artifact.",
    "Temperatures in Paris reached {n} degrees on {date}, the warmest day of the year.",
    "Cache hit rate was {pct}% with a TTL of {n} seconds and {n2} MB of memory.",
    "Call the /v1/chat/completions endpoint with max_tokens set to {n}.",
    "The Kubernetes cluster in eu-west-1 runs {n} nodes of type m5.xlarge.",
    "Grace periods for late events default to {n} minutes in Quix Streams.",
    "May the best proposal win: submissions close on {date}.",
]


REAL_NAMES = ("Guido", "Hettinger", "Raymond", "Harold", "Arthur", "Monty", "Neumann", "Tim Peters", "Knuth",
              "Lancelot", "Galahad", "Bill")


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        candidate = body + check
        total = 0
        for i, ch in enumerate(reversed(candidate)):
            d = int(ch)
            if i % 2 == 1:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        if total % 10 == 0:
            return candidate
    raise AssertionError


CARD_KINDS = [  # (prefix chooser, length, grouping) -- several that Presidio misses
    (lambda r: "4", 16, (4, 4, 4, 4)), (lambda r: "4", 19, (4, 4, 4, 4, 3)), (lambda r: "4", 13, (4, 4, 5)),
    (lambda r: str(r.randint(51, 55)), 16, (4, 4, 4, 4)), (lambda r: str(r.randint(2221, 2720)), 16, (4, 4, 4, 4)),
    (lambda r: r.choice(["34", "37"]), 15, (4, 6, 5)), (lambda r: "6011", 16, (4, 4, 4, 4)),
    (lambda r: str(r.randint(3528, 3589)), 16, (4, 4, 4, 4)), (lambda r: "36", 14, (4, 6, 4)),
    (lambda r: r.choice(["5018", "5020", "5038", "5893", "6304", "6759", "6761", "6763"]), 0, None),
    (lambda r: "62", 16, (4, 4, 4, 4)), (lambda r: str(r.randint(2200, 2204)), 16, (4, 4, 4, 4)),
]


def _card(rng: random.Random) -> str:
    prefix_fn, length, grouping = rng.choice(CARD_KINDS)
    prefix = prefix_fn(rng)
    if not length:  # Maestro: 12-19 digits, grouped in fours
        length = rng.choice([12, 13, 16, 18, 19])
    digits = _luhn_complete(prefix, length, rng)
    if grouping is None:
        grouping = tuple([4] * (length // 4) + ([length % 4] if length % 4 else []))
    style = rng.random()
    if style < 0.25:
        return digits
    sep = " " if style < 0.75 else "-"
    out, pos = [], 0
    for size in grouping:
        out.append(digits[pos:pos + size])
        pos += size
    return sep.join(out)


def _phone(rng: random.Random) -> str:
    import phonenumbers
    from phonenumbers import PhoneNumberFormat

    national = rng.random() < 0.5
    region = rng.choice(NATIONAL_REGIONS if national else NATIONAL_REGIONS + INTERNATIONAL_ONLY)
    example = phonenumbers.example_number_for_type(region, rng.choice(
        [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]))
    if example is None:
        example = phonenumbers.example_number(region)
    nsn = str(example.national_number)
    for _ in range(200):  # same length and leading digits as the example, random rest, valid
        keep = max(2, len(nsn) // 3)
        candidate = nsn[:keep] + "".join(rng.choice(string.digits) for _ in range(len(nsn) - keep))
        number = phonenumbers.parse("+" + str(example.country_code) + candidate, None)
        if phonenumbers.is_valid_number(number):
            break
    else:
        number = example
    if national:
        text = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
    else:
        text = phonenumbers.format_number(number, rng.choice([PhoneNumberFormat.INTERNATIONAL,
                                                               PhoneNumberFormat.INTERNATIONAL,
                                                               PhoneNumberFormat.E164]))
    style = rng.random()
    if style < 0.15:
        text = text.replace(" ", "-")
    elif style < 0.22:
        text = text.replace(" ", ".")
    return text


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _btc(rng: random.Random) -> str:
    payload = bytes([rng.choice([0, 5])]) + bytes(rng.getrandbits(8) for _ in range(20))
    data = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, rem = divmod(n, 58)
        out = _B58[rem] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


AN = string.ascii_letters + string.digits


def _b64url(rng: random.Random, raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _secret(rng: random.Random) -> tuple[str, str]:
    """A secret in context: (template with {s}, secret)."""
    kind = rng.randrange(14)
    if kind == 0:
        return "Here is my config: OPENAI_API_KEY={s}", "sk-proj-" + _rand(rng, AN + "_-", 48)
    if kind == 1:
        return "I set ANTHROPIC_API_KEY to {s} but still get 401.", "sk-ant-api03-" + _rand(rng, AN + "_-", 93) + "AA"
    if kind == 2:
        return "git clone https://{s}@github.com/acme/infra.git fails", "ghp_" + _rand(rng, AN, 36)
    if kind == 3:
        return "aws configure gave me AWS_ACCESS_KEY_ID={s}", "AKIA" + _rand(rng, string.ascii_uppercase + "234567", 16)
    if kind == 4:
        return "aws_secret_access_key = {s}", _rand(rng, AN + "/+", 40)
    if kind == 5:
        return "Slack bot token {s} stopped working.", "xoxb-" + "-".join(_rand(rng, string.digits, 12) for _ in range(2)) + "-" + _rand(rng, AN, 24)
    if kind == 6:
        return "Stripe says the key {s} is invalid.", "sk_live_" + _rand(rng, AN, 24)
    if kind == 7:
        header = _b64url(rng, b'{"alg":"HS256","typ":"JWT"}')
        payload = _b64url(rng, json.dumps({"sub": str(rng.randrange(10**6)), "exp": 1700000000 + rng.randrange(10**7)}).encode())
        return "Decode this token: {s}", f"{header}.{payload}.{_b64url(rng, bytes(rng.getrandbits(8) for _ in range(32)))}"
    if kind == 8:
        body = "\n".join(_rand(rng, AN + "+/", 64) for _ in range(rng.randint(4, 12)))
        return "Why does ssh reject this key?\n{s}\n", f"-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----"
    if kind == 9:
        return "curl -H 'Authorization: Bearer {s}' https://api.internal/v2/users", _rand(rng, AN + "._-", 40)
    if kind == 10:
        return "DATABASE_URL=postgres://app:{s}@db.internal:5432/prod", _rand(rng, AN, 10) + rng.choice("!#%") + str(rng.randrange(100))
    if kind == 11:
        return "my password is {s} but the login page rejects it", rng.choice(["Sommer", "Winter", "Dragon", "Monkey"]) + str(rng.randrange(1000, 9999)) + rng.choice("!?$")
    if kind == 12:
        return "Google Maps key: {s}", "AIza" + _rand(rng, AN + "_-", 35)
    return "HF_TOKEN={s} python train.py", "hf_" + _rand(rng, AN, 34)


class CorpusGenerator:
    def __init__(self, seed: int = 7):
        from faker import Faker

        self.rng = random.Random(seed)
        self.fakers = {}
        for loc in set(NAME_LOCALES + IBAN_LOCALES + ["en_US"]):
            fake = Faker(loc)
            fake.seed_instance(seed * 1000 + zlib.crc32(loc.encode()) % 1000)  # not hash(): salted per process
            self.fakers[loc] = fake
        import pydoc_data.topics

        paragraphs = []
        for body in pydoc_data.topics.topics.values():
            for para in body.split("\n\n"):
                para = " ".join(para.split())
                # Real people named in the Python docs would be unlabeled PII in "clean" text.
                if 80 <= len(para) <= 1200 and "@" not in para and not any(n in para for n in REAL_NAMES):
                    paragraphs.append(para)
        self.paragraphs = paragraphs

    # -- pieces --------------------------------------------------------------------------------

    def _person(self) -> tuple[str, str, str]:
        loc = self.rng.choice(NAME_LOCALES)
        fake = self.fakers[loc]
        if loc in ("ja_JP", "zh_CN"):
            first, last = fake.first_romanized_name(), fake.last_romanized_name()
        else:
            first, last = fake.first_name(), fake.last_name()
        return first, last, loc

    def _filler(self, words: int) -> str:
        rng = self.rng
        out: list[str] = []
        count = 0
        while count < words:
            if rng.random() < 0.55:
                piece = rng.choice(self.paragraphs)
            else:
                piece = self._business()
            out.append(piece)
            count += len(piece.split())
        return " ".join(out)

    def _business(self) -> str:
        rng = self.rng
        return rng.choice(BUSINESS).format(
            pct=round(rng.uniform(0.5, 60), 1), amount=f"{rng.randrange(1000, 9_999_999):,}", q=rng.randint(1, 4),
            year=rng.randint(2019, 2026), order=rng.randrange(10**7, 10**10),
            date=f"{rng.randint(2019, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            n=rng.randint(2, 400), n2=rng.randint(2, 400), n4=rng.randint(1000, 9999),
            ver=f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 40)}",
            time=f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", sha=uuid.UUID(int=rng.getrandbits(128)).hex[:40],
            uuid=uuid.UUID(int=rng.getrandbits(128)), port=rng.choice([8080, 3000, 5432, 9092, 8000]))

    def _pii_sentence(self, b: SpanBuilder) -> None:
        rng = self.rng
        first, last, loc = self._person()
        full = f"{first} {last}"
        fake = self.fakers["en_US"]
        lower = rng.random() < 0.12
        name = full.lower() if lower else full
        email_local = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{last}{rng.randrange(100)}",
                                  fake.user_name()]).lower()
        email_local = "".join(ch for ch in email_local if ch.isascii() and (ch.isalnum() or ch in "._")) or "user"
        email = f"{email_local}@{rng.choice(['gmail.com', 'outlook.com', 'yahoo.co.uk', 'web.de', 'acme-corp.com', 'example.org', 'uni-heidelberg.de', 'mail.ru', 'proton.me'])}"
        P, E, PH = ("PERSON", name), ("EMAIL_ADDRESS", email), ("PHONE_NUMBER", _phone(rng))
        F, L = ("PERSON", first.lower() if lower else first), ("PERSON", last)
        choice = rng.randrange(24)
        templates = [
            ("My name is {p} and my email is {e}.", {"p": P, "e": E}),
            ("Please contact {p} at {ph} or {e} before Friday.", {"p": P, "ph": PH, "e": E}),
            ("Hi, I'm {f}. Can you help me write a complaint about my landlord?", {"f": F}),
            ("{p} called yesterday about the invoice; the callback number is {ph}.", {"p": P, "ph": PH}),
            ("Customer: {p}\nEmail: {e}\nPhone: {ph}\n", {"p": P, "e": E, "ph": PH}),
            ("Refund the duplicate charge on card {c} for {p}.", {"c": ("CREDIT_CARD", _card(rng)), "p": P}),
            ("Wire the deposit to IBAN {i} (account holder: {p}).", {"i": ("IBAN_CODE", self._iban()), "p": P}),
            ("My social security number is {s}, is it safe to share it with the bank?", {"s": ("US_SSN", self._ssn())}),
            ("SSN {s} appears twice in the export, can you deduplicate the rows?", {"s": ("US_SSN", self._ssn())}),
            ("The failed logins all came from {ip}; should we block it?", {"ip": ("IP_ADDRESS", self._ip())}),
            ("Send the payout to my wallet {w} please.", {"w": ("CRYPTO", _btc(rng))}),
            ("Best regards,\n{p}\n{ph}", {"p": P, "ph": PH}),
            ("Thanks,\n{f}", {"f": F}),
            ("I met with {p} and {p2} to review the roadmap.", {"p": P, "p2": ("PERSON", " ".join(self._person()[:2]))}),
            ("{p}'s flight lands at 9:40, can you book a taxi?", {"p": P}),
            ("Dr. {l} prescribed a higher dose; summarise the side effects.", {"l": L}),
            ("Write a birthday message for my colleague {f}.", {"f": F}),
            ("Card number {c}, expiry 09/27, CVV 123 - why was it declined?", {"c": ("CREDIT_CARD", _card(rng))}),
            ("You can reach me on {ph} after 6pm.", {"ph": PH}),
            ("Forward the contract to {e} and cc {p}.", {"e": E, "p": P}),
            ("ssh deploy@{ip} -p 2222 keeps timing out", {"ip": ("IP_ADDRESS", self._ip())}),
            ("Ask {p} whether the quarterly numbers are final.", {"p": P}),
            ("Her IBAN is {i}.", {"i": ("IBAN_CODE", self._iban())}),
            ("Employee {p} (ID 4471) requested access; manager approval pending.", {"p": P}),
        ]
        if choice < len(templates) - 0 and rng.random() < 0.85:
            template, values = templates[choice]
        else:
            template, secret = _secret(rng)
            values = {"s": ("SECRET", secret)}
        b.template(template, values)

    def _iban(self) -> str:
        loc = self.rng.choice(IBAN_LOCALES)
        iban = self.fakers[loc].iban()
        if self.rng.random() < 0.5:
            return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
        return iban

    def _ssn(self) -> str:
        ssn = self.fakers["en_US"].ssn()
        style = self.rng.random()
        return ssn if style < 0.8 else ssn.replace("-", " ")

    def _ip(self) -> str:
        fake = self.fakers["en_US"]
        if self.rng.random() < 0.75:
            return fake.ipv4_public()
        # global unicast (2000::/3), as real client addresses are; compressed form half the time
        import ipaddress

        value = ipaddress.IPv6Address((self.rng.randint(0x2400, 0x2a0f) << 112) | self.rng.getrandbits(112))
        return value.compressed if self.rng.random() < 0.5 else value.exploded

    # -- samples -------------------------------------------------------------------------------

    def sample(self, pii_ratio: float = 0.3) -> Sample:
        rng = self.rng
        is_prompt = rng.random() < 0.5
        words = int(min(900, max(8, rng.lognormvariate(math.log(60 if is_prompt else 170), 0.8))))
        b = SpanBuilder()
        if is_prompt:
            b.add(rng.choice(TASKS) + "\n\n")
        body = self._filler(words)
        if rng.random() < pii_ratio:
            cut_points = sorted(rng.sample(range(len(body) + 1), k=1))
            sentences = rng.choice([1, 1, 1, 2, 3])
            at = body.rfind(". ", 0, cut_points[0])
            at = 0 if at < 0 else at + 2
            b.add(body[:at])
            for _ in range(sentences):
                self._pii_sentence(b)
                b.add(" ")
            b.add(body[at:])
        else:
            b.add(body)
        return b.build()

    def corpus(self, n: int, pii_ratio: float = 0.3) -> list[Sample]:
        return [self.sample(pii_ratio) for _ in range(n)]
