"""The held-out corpus: hand-written real-world shapes filled by several fake-data generators.

Independent of the recognisers' rules: the values come from faker and mimesis (their own
per-locale phone masks, names, e-mail and IBAN generators) or from formats as people paste
them (IPv6 forms, provider keys, k8s/.env/Terraform blocks); the surroundings are support
tickets, pasted logs, JSON/YAML/CSV, signatures, markdown tables, HTTP headers, diffs and
code. Clean samples carry PII lookalikes (browser versions, ISBN/EAN, order and tracking
numbers, dotted timestamps, digests, UUIDs, masked cards, key placeholders, month and
weekday abbreviations). Labels come from the generator: it records where it put each value.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import string
import uuid
import zlib

from ops.bench.redaction_corpus.labels import Sample, SpanBuilder
from ops.bench.redaction_corpus.synthetic import _btc, _card, _luhn_complete

# locale -> (faker locale, mimesis locale or None, phone source)
LOCALES = {
    "en_US": ("en_US", "en", "faker"), "en_GB": ("en_GB", "en-gb", "both"), "de_DE": ("de_DE", "de", "both"),
    "fr_FR": ("fr_FR", "fr", "both"), "es_MX": ("es_MX", "es-mx", "both"), "it_IT": ("it_IT", "it", "both"),
    "pt_BR": ("pt_BR", "pt-br", "both"), "nl_NL": ("nl_NL", "nl", "both"), "en_IN": ("en_IN", None, "faker"),
    "ja_JP": ("ja_JP", "ja", "both"), "en_AU": ("en_AU", None, "faker"), "en_CA": ("en_CA", "en-ca", "faker"),
    "es_ES": ("es_ES", "es", "faker"), "en_ZA": ("zu_ZA", None, "plan"), "ko_KR": ("ko_KR", "ko", "both"),
}
# Names from outside the European lists: faker locales in Latin script, plus hand-written
# romanised names as people write them (family name first for East Asia).
NAME_ONLY = {"yo_NG": "yo_NG", "ig_NG": "ig_NG", "ha_NG": "ha_NG", "ga_IE": "ga_IE", "en_NG": "en_NG",
             "en_PK": "en_PK", "tw_GH": "tw_GH"}
ROMANISED = {
    "ar": ["Omar Haddad", "Layla Al-Sayed", "Youssef El Amrani", "Fatima Zahra Benali", "Khalid bin Saeed",
           "Mariam Al Nuaimi", "Tariq Aziz Qureshi", "Noor Abdel-Rahman", "Hassan Mahmoud", "Rania Khoury",
           "Abdullah Al-Harbi", "Samira Bouazizi", "Ahmed Farouk", "Huda Nasser", "Karim Belkacem"],
    "zh": ["Wang Xiuying", "Li Wei", "Zhang Min", "Liu Yang", "Chen Jing", "Huang Lei", "Zhao Qiang", "Wu Fang"],
    "ko": ["Kim Min-jun", "Lee Seo-yeon", "Park Ji-hoon", "Choi Yu-na", "Jung Hae-in", "Kang Ha-eun"],
    "ja": ["Tanaka Yuta", "Suzuki Haruka", "Takahashi Ren", "Watanabe Aoi", "Ito Sota", "Yamamoto Yui"],
    "ta": ["Senthil Kumar Ramasamy", "Priya Venkataraman", "Karthik Subramanian", "Lakshmi Narayanan"],
}
PARTICLE_NAMES = ["Jan van der Berg", "Anna de la Cruz", "Luca di Stefano", "Klaus von Trapp", "Pieter de Vries",
                  "María del Carmen Ortega", "Sophie van den Heuvel", "Ana dos Santos", "Giulia De Luca",
                  "Hans-Peter von Holstein", "Jean-Luc Le Gall", "Catalina García-Márquez"]
MONTH_DAY = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug",
             "Sep", "Sept", "Oct", "Nov", "Dec"]
SOUTH_AFRICA = ["+27 82 {a} {b}", "082 {a} {b}", "+27 (0)21 {a} {b}", "021 {a} {b}", "+27-11-{a}-{b}"]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _ean13(rng: random.Random) -> str:
    body = rng.choice(["400", "501", "590", "761", "871"]) + _digits(rng, 9)
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


def _isbn13(rng: random.Random) -> str:
    body = "978" + _digits(rng, 9)
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body))
    d = body + str((10 - total % 10) % 10)
    return rng.choice([d, f"{d[:3]}-{d[3]}-{d[4:8]}-{d[8:12]}-{d[12]}", f"{d[:3]}-{d[3:5]}-{d[5:9]}-{d[9:12]}-{d[12]}"])


class RealWorldGenerator:
    def __init__(self, seed: int = 11):
        from faker import Faker

        self.rng = random.Random(seed)
        self.fakers = {}
        for key, (faker_locale, _m, _p) in LOCALES.items():
            self.fakers[key] = self._faker(Faker, faker_locale, seed)
        for key, faker_locale in NAME_ONLY.items():
            self.fakers[key] = self._faker(Faker, faker_locale, seed)
        self.mimesis = {}
        from mimesis import Internet, Person
        from mimesis.locales import Locale

        for key, (_f, mimesis_locale, _p) in LOCALES.items():
            if mimesis_locale:
                self.mimesis[key] = Person(Locale(mimesis_locale), seed=seed + zlib.crc32(key.encode()) % 997)
        self.internet = Internet(seed=seed)

    @staticmethod
    def _faker(factory, locale: str, seed: int):
        fake = factory(locale)
        fake.seed_instance(seed * 1000 + zlib.crc32(locale.encode()) % 1000)
        return fake

    # -- values --------------------------------------------------------------------------------

    def person(self, locale: str) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.12:
            return rng.choice(PARTICLE_NAMES)
        if roll < 0.3:
            group = rng.choice(list(ROMANISED))
            return rng.choice(ROMANISED[group])
        if roll < 0.45:
            fake = self.fakers[rng.choice(list(NAME_ONLY))]
            return f"{fake.first_name()} {fake.last_name()}"
        if locale in ("ja_JP", "ko_KR"):
            fake = self.fakers["ja_JP"]
            return f"{fake.last_romanized_name()} {fake.first_romanized_name()}"  # family name first
        person = self.mimesis.get(locale)
        if person is not None and rng.random() < 0.5:
            return f"{person.first_name()} {person.last_name()}"
        fake = self.fakers[locale]
        return f"{fake.first_name()} {fake.last_name()}"

    def phone(self, locale: str) -> str:
        rng = self.rng
        source = LOCALES[locale][2]
        if source == "plan":
            return rng.choice(SOUTH_AFRICA).format(a=_digits(rng, 3), b=_digits(rng, 4))
        if source == "both" and rng.random() < 0.4:
            return self.mimesis[locale].phone_number()
        value = self.fakers[locale].phone_number()
        if rng.random() < 0.15 and "x" not in value:
            value += rng.choice([" ext. ", " x", " #", " ext "]) + _digits(rng, rng.randint(2, 4))
        return value

    def email(self, locale: str) -> str:
        if self.rng.random() < 0.5 and locale in self.mimesis:
            return self.mimesis[locale].email()
        return self.fakers[locale].email()

    def ipv4(self) -> str:
        return self.fakers["en_US"].ipv4_public()

    def ipv6(self) -> str:
        rng = self.rng
        address = ipaddress.IPv6Address((rng.randint(0x2001, 0x2a0f) << 112) | rng.getrandbits(112))
        form = rng.randrange(6)
        if form == 0:
            return address.exploded
        if form == 1:
            return address.compressed
        if form == 2:  # a run of zeros compressed away
            groups = [f"{rng.getrandbits(16):x}" for _ in range(rng.randint(2, 4))]
            return ":".join(groups[:2]) + "::" + ":".join(groups[2:] or [f"{rng.getrandbits(16):x}"])
        if form == 3:
            return "::ffff:" + self.ipv4()
        if form == 4:  # link-local with a zone id: the interface id is the device's
            return f"fe80::{rng.getrandbits(16):x}:{rng.getrandbits(8):x}ff:fe{rng.getrandbits(8):02x}:{rng.getrandbits(16):x}%" + rng.choice(["eth0", "en0", "wlan0", "3"])
        return self.internet.ip_v6()

    def ip(self) -> str:
        return self.ipv4() if self.rng.random() < 0.5 else self.ipv6()

    def iban(self, locale: str) -> str:
        fake = self.fakers[locale if locale in ("de_DE", "fr_FR", "it_IT", "nl_NL", "en_GB", "es_ES") else "de_DE"]
        value = fake.iban()
        if self.rng.random() < 0.4:
            value = " ".join(value[i:i + 4] for i in range(0, len(value), 4))
        return value.lower() if self.rng.random() < 0.3 else value

    def card(self) -> str:
        if self.rng.random() < 0.5:
            return self.fakers["en_US"].credit_card_number()
        return _card(self.rng)

    def ssn(self) -> str:
        return self.fakers["en_US"].ssn()

    def password(self) -> str:
        fake = self.fakers["en_US"]
        return fake.password(length=self.rng.randint(10, 20), special_chars=self.rng.random() < 0.7)

    def api_key(self) -> str:
        rng = self.rng
        alnum = string.ascii_letters + string.digits
        kind = rng.randrange(6)
        if kind == 0:
            return "sk-proj-" + "".join(rng.choice(alnum + "_-") for _ in range(56))
        if kind == 1:
            return "ghp_" + "".join(rng.choice(alnum) for _ in range(36))
        if kind == 2:
            return "sk_live_" + "".join(rng.choice(alnum) for _ in range(24))
        if kind == 3:
            return "xoxb-" + _digits(rng, 12) + "-" + _digits(rng, 13) + "-" + "".join(rng.choice(alnum) for _ in range(24))
        if kind == 4:
            return "AKIA" + "".join(rng.choice(string.ascii_uppercase + "234567") for _ in range(16))
        return "hf_" + "".join(rng.choice(alnum) for _ in range(34))

    # -- lookalikes (never labeled) ----------------------------------------------------------------

    def lookalikes(self) -> dict[str, tuple[None, str]]:
        rng = self.rng
        day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(2019, 2026)
        values = {
            "chrome": f"Chrome/{rng.randint(100, 131)}.0.{rng.randint(0, 6999)}.{rng.randint(0, 250)}",
            "driver": f"{rng.randint(390, 560)}.{rng.randint(10, 199)}.{rng.randint(1, 99):02d}",
            "isbn": _isbn13(rng), "ean": _ean13(rng),
            "po": rng.choice(["PO-", "PO ", "PO#"]) + _digits(rng, 10),
            "tracking": rng.choice(["1Z" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
                                    "9400 1" + " ".join(_digits(rng, 4) for _ in range(5)),
                                    _digits(rng, 12)]),
            "order": _digits(rng, rng.randint(8, 11)),
            "ts": f"{day:02d}.{month:02d}.{year} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
            "sha": hashlib.sha256(str(rng.random()).encode()).hexdigest(),
            "uuid": str(uuid.UUID(int=rng.getrandbits(128))),
            "masked": rng.choice(["**** **** **** ", "XXXX-XXXX-XXXX-", "•••• ", "ending in "]) + _digits(rng, 4),
            "placeholder": rng.choice(["sk-...", "sk-xxxxxxxxxxxxxxxx", "<YOUR_API_KEY>", "sk-your-key-here",
                                       "${OPENAI_API_KEY}", "ghp_xxxxxxxxxxxxxxxxxxxx"]),
            "abbr": rng.choice(MONTH_DAY), "abbr2": rng.choice(MONTH_DAY),
            "amount": f"{rng.randint(1, 999)}.{_digits(rng, 3)},{_digits(rng, 2)}",
            "version": f"{rng.randint(1, 20)}.{rng.randint(0, 40)}.{rng.randint(0, 99)}",
            "private_ip": rng.choice(["10.0.3.17", "192.168.1.20", "172.20.0.5", "127.0.0.1", "::1", "fd00::1a"]),
            "dotted_date": f"{day:02d}.{month:02d}.{year}",
            "epoch": str(rng.randint(1_600_000_000_000, 1_800_000_000_000)),
            "build": f"{year}{month:02d}{day:02d}.{rng.randint(1, 9)}",
            "card_test": _luhn_complete("4", 16, rng)[:6] + "******" + _digits(rng, 4),
        }
        return {k: (None, v) for k, v in values.items()}

    # -- samples -------------------------------------------------------------------------------

    def sample(self, pii_ratio: float) -> Sample:
        rng = self.rng
        locale = rng.choice(list(LOCALES))
        b = SpanBuilder()
        values = self.lookalikes()
        if rng.random() < pii_ratio:
            name = self.person(locale)
            values.update({
                "name": ("PERSON", name), "name_lower": ("PERSON", name.lower()),
                "name2": ("PERSON", self.person(locale)), "first": ("PERSON", name.split()[0]),
                "email": ("EMAIL_ADDRESS", self.email(locale)), "email2": ("EMAIL_ADDRESS", self.email(locale)),
                "phone": ("PHONE_NUMBER", self.phone(locale)), "phone2": ("PHONE_NUMBER", self.phone(locale)),
                "ip": ("IP_ADDRESS", self.ip()), "ip4": ("IP_ADDRESS", self.ipv4()), "ip6": ("IP_ADDRESS", self.ipv6()),
                "iban": ("IBAN_CODE", self.iban(locale)), "card": ("CREDIT_CARD", self.card()),
                "ssn": ("US_SSN", self.ssn()), "btc": ("CRYPTO", _btc(rng)),
                "password": ("SECRET", self.password()), "key": ("SECRET", self.api_key()),
                "key2": ("SECRET", self.api_key()),
            })
            b.template(rng.choice(PII_TEMPLATES), values)
            if rng.random() < 0.3:
                b.add("\n\n")
                b.template(rng.choice(CLEAN_TEMPLATES), values)
        else:
            b.template(rng.choice(CLEAN_TEMPLATES), values)
            if rng.random() < 0.4:
                b.add("\n\n")
                b.template(rng.choice(CLEAN_TEMPLATES), values)
        return b.build(locale)

    def corpus(self, n: int, pii_ratio: float = 0.5) -> list[Sample]:
        return [self.sample(pii_ratio) for _ in range(n)]


PII_TEMPLATES = [
    # support tickets and chat
    "Subject: Locked out since the {abbr} update\n\nHi team,\nI'm {name} ({email}). My account was locked after "
    "the {ts} release. You can call me at {phone}. The request came from {ip}.\nThanks",
    "hey its {name_lower} here, my number is {phone} and my ssn is {ssn} can u update my profile",
    "hi, {name_lower} again - the refund for order {order} still hasn't arrived, call {phone2} pls",
    "Customer {name} reports that card {card} was charged twice on {dotted_date}. Tracking {tracking}.",
    "Please wire the balance to IBAN {iban} (account holder {name}) before {abbr} {dotted_date}.",
    "Can you change the payout iban to {iban}? thanks, {first}",
    "Meeting with Dr. {name} moved to {abbr}; dial-in {phone}.",
    "I met {name} and {name2} at the conference, both want the deck by {abbr}.",
    "Send the refund to my wallet {btc}, my email is {email}",
    # pasted logs
    "{dotted_date} 14:02:11 INFO auth login ok user={email} ip={ip} ua=\"Mozilla/5.0 (X11; Linux x86_64) {chrome} Safari/537.36\"",
    "[{ts}] WARN rate limit exceeded client={ip6} request_id={uuid}",
    "sshd[2211]: Failed password for root from {ip4} port 52144 ssh2\nsshd[2211]: Accepted publickey for deploy from {ip6} port 50022",
    "curl -v http://[{ip6}]:8080/health\n* Trying [{ip6}]:8080...\n* connect to {ip4} port 443 failed",
    "ping6 {ip6} -> 64 bytes from {ip6}: icmp_seq=1 ttl=57 time=14.2 ms",
    # structured data
    "{{\"customer\": {{\"name\": \"{name}\", \"phone\": \"{phone}\", \"email\": \"{email}\"}}, \"order\": \"{po}\", \"sha\": \"{sha}\"}}",
    "customer:\n  name: {name}\n  phone: '{phone}'\n  email: {email}\n  card: \"{card}\"\n  created: {dotted_date}",
    "id,name,phone,email,last_ip\n{order},{name},{phone},{email},{ip4}\n{ean},{name2},{phone2},{email2},{ip6}",
    "| Name | Phone | E-mail |\n|------|-------|--------|\n| {name} | {phone} | {email} |\n| {name2} | {phone2} | {email2} |",
    "Best regards,\n\n{name}\nSenior Account Manager | Acme GmbH\nT: {phone} | M: {phone2}\n{email}",
    "--\n{name}\nTel. {phone}\nwww.example.com",
    # configuration and code
    "env:\n  - name: DB_PASSWORD\n    value: \"{password}\"\n  - name: OPENAI_API_KEY\n    value: {key}\n  - name: LOG_LEVEL\n    value: info",
    "DATABASE_URL=postgres://app:{password}@db.internal:5432/app\nSTRIPE_SECRET_KEY={key}\nADMIN_EMAIL={email}",
    "resource \"aws_db_instance\" \"main\" {{\n  engine   = \"postgres\"\n  username = \"admin\"\n  password = \"{password}\"\n}}",
    "GET /v1/me HTTP/1.1\nHost: api.example.com\nAuthorization: Bearer {key}\nX-Forwarded-For: {ip4}, {ip6}\nUser-Agent: Mozilla/5.0 {chrome}",
    "--- a/config/contacts.yaml\n+++ b/config/contacts.yaml\n-  oncall: {phone}\n+  oncall: {phone2}\n-  token: {key}\n+  token: ${{SLACK_TOKEN}}",
    "client = OpenAI(api_key=\"{key}\")\nsend_sms(to=\"{phone}\", body=\"hi {first}\")",
    "export GITHUB_TOKEN={key2}\nssh admin@{ip4}",
    "Employee record: SSN {ssn}, phone {phone}, start date {dotted_date}",
]

CLEAN_TEMPLATES = [
    "The tab crashes with {chrome} on driver {driver}; it started with build {build}.",
    "Order the book (ISBN {isbn}) and the charger (EAN {ean}) on the same {po}.",
    "Your parcel {tracking} for order #{order} ships {abbr}; the invoice total is EUR {amount}.",
    "The backup of {ts} finished; the next one runs {abbr} at 02:00 and {abbr2} at 14:00.",
    "sha256 {sha} matches the release artifact; request id {uuid}.",
    "Charged to card {masked}. Test card {card_test} is declined in staging.",
    "Set OPENAI_API_KEY={placeholder} in your shell, then run the script.",
    "env:\n  - name: OPENAI_API_KEY\n    valueFrom:\n      secretKeyRef:\n        name: openai\n        key: api-key",
    "resource \"aws_db_instance\" \"main\" {{\n  password = var.db_password\n  engine_version = \"{version}\"\n}}",
    "{{\"service\": \"billing\", \"version\": \"{version}\", \"build\": \"{build}\", \"ts\": {epoch}, \"host\": \"{private_ip}\"}}",
    "sku,ean,price,updated\nA-{order},{ean},{amount},{dotted_date}\nB-{order},{isbn},19.99,{dotted_date}",
    "| Release | Date | Digest |\n|---|---|---|\n| {version} | {dotted_date} | {sha} |",
    "Opening hours: {abbr}-{abbr2} 09:00-17:00. Quarterly report covers Jan, Feb and Mar.",
    "Upgrade from {version} to the latest; see {chrome} release notes and driver {driver}.",
    "The service listens on {private_ip} port 8443 and logs to /var/log/app-{dotted_date}.log",
    "GET /v1/health HTTP/1.1\nHost: api.example.com\nAuthorization: Bearer {placeholder}\nUser-Agent: {chrome}",
    "Will you review the PR before the team leaves on {abbr}? Grace period is {order} ms.",
]


def generate_realworld(n: int, seed: int = 11, pii_ratio: float = 0.5) -> list[Sample]:
    return RealWorldGenerator(seed).corpus(n, pii_ratio)
