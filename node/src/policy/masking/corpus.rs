//! A generated corpus of personal data in realistic surroundings (log lines, JSON, URLs,
//! punctuation, other digits, line breaks): the recall of each detector, and how often
//! look-alikes are masked. Deterministic (a fixed seed, nothing read from files); run with
//! `--nocapture` to see the figures docs/policy.md reports.

use super::*;

/// Samples per kind, for the entities and for the look-alikes.
const SAMPLES: usize = 20_000;

/// splitmix64: deterministic and enough to vary the shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.below(10) as u8))
            .collect()
    }

    fn letters(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'A' + self.below(26) as u8))
            .collect()
    }
}

/// Makes one value of a kind.
type Generator = fn(&mut Rng) -> String;

/// Where a value is embedded: `{}` is the value.
const SURROUNDINGS: &[&str] = &[
    "{}",
    "2026-11-27T10:45:13Z INFO auth: user={} action=login ip=10.0.4.17",
    "{\"id\": 4821, \"contact\": \"{}\", \"active\": true}",
    "https://app.example.com/api/v2/customers?q={}&page=3",
    "({})",
    "[{}]",
    "<{}>",
    "'{}',",
    "\"{}\".",
    "value: {}; next",
    "line one\n{}\nline three",
    "{}\r\n",
    "\t{}\t42",
    "ref 42 {}",
    "{} 12/28",
    "{} exp 05/27 cvv 123",
    "{} EUR",
    "id=9001,{},2026",
    "ACCT{}",
    "{}END",
    "-- {}\nDELETE FROM t",
];

/// Characters that give text its structure: masking must keep every one outside the value.
const STRUCTURE: &[char] = &[
    '\n', '\r', '\t', '"', '\'', '(', ')', '{', '}', '[', ']', '<', '>', ',', ';', '=', '&', '?',
];

fn structure(s: &str) -> usize {
    s.chars().filter(|c| STRUCTURE.contains(c)).count()
}

fn card(rng: &mut Rng) -> String {
    let (prefix, len) = *rng.pick(&[
        ("4", 16),
        ("4", 13),
        ("4", 19),
        ("51", 16),
        ("55", 16),
        ("2221", 16),
        ("34", 15),
        ("37", 15),
        ("6011", 16),
        ("65", 16),
        ("35", 16),
    ]);
    let body = format!("{prefix}{}", rng.digits(len - prefix.len() - 1));
    let number = (b'0'..=b'9')
        .map(|d| format!("{body}{}", char::from(d)))
        .find(|n| luhn(n))
        .expect("one check digit fits");
    let sep = *rng.pick(&["", " ", "-"]);
    let sizes: &[usize] = if len == 15 {
        &[4, 6, 5]
    } else {
        &[4, 4, 4, 4, 3]
    };
    let mut out = String::new();
    let mut rest = number.as_str();
    for &n in sizes {
        if rest.is_empty() {
            break;
        }
        let (group, tail) = rest.split_at(n.min(rest.len()));
        if !out.is_empty() {
            out.push_str(sep);
        }
        out.push_str(group);
        rest = tail;
    }
    out
}

fn iban(rng: &mut Rng) -> String {
    let (country, len, bank_letters) = *rng.pick(&[
        ("DE", 22, 0),
        ("GB", 22, 4),
        ("FR", 27, 0),
        ("NL", 18, 4),
        ("ES", 24, 0),
        ("IT", 27, 1),
        ("BE", 16, 0),
        ("CH", 21, 0),
        ("NO", 15, 0),
        ("PL", 28, 0),
        ("IE", 22, 4),
        ("MT", 31, 4),
        ("LC", 32, 4),
        ("RU", 33, 0),
    ]);
    let bban = format!(
        "{}{}",
        rng.letters(bank_letters),
        rng.digits(len - 4 - bank_letters)
    );
    let check = 98 - iban_mod97(format!("{country}00{bban}").as_bytes());
    let compact = format!("{country}{check:02}{bban}");
    if rng.below(2) == 0 {
        return compact;
    }
    let groups: Vec<&str> = compact
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ASCII"))
        .collect();
    groups.join(" ")
}

fn ssn(rng: &mut Rng) -> String {
    let area = loop {
        let a = 1 + rng.below(899);
        if a != 666 {
            break a;
        }
    };
    format!(
        "{area:03}-{:02}-{:04}",
        1 + rng.below(99),
        1 + rng.below(9999)
    )
}

fn email(rng: &mut Rng) -> String {
    let local = *rng.pick(&[
        "ada",
        "grace.hopper",
        "j.smith+news",
        "alan_turing",
        "ops-team",
        "x1234",
        "josé",
        "müller.k",
        "zoë.ñandú",
        "дмитрий",
        "用户",
        "αλέξης",
        "søren",
        "राम",
    ]);
    let domain = *rng.pick(&[
        "example.com",
        "mail.example.co.uk",
        "corp-mail.io",
        "bücher.de",
        "пример.рф",
        "例子.中国",
        "εταιρεία.ελ",
        "डाक.भारत",
        "xn--bcher-kva.xn--p1ai",
    ]);
    format!("{local}{}@{domain}", rng.below(100))
}

fn phone(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => format!("+44 20 {} {}", rng.digits(4), rng.digits(4)),
        1 => format!(
            "({}) {}-{}",
            200 + rng.below(800),
            rng.digits(3),
            rng.digits(4)
        ),
        2 => format!("{}-555-{}", 200 + rng.below(800), rng.digits(4)),
        _ => format!("+1{}{}", 200 + rng.below(800), rng.digits(7)),
    }
}

/// A secret of each shape the detector knows (there is no recall goal for secrets).
fn secret(rng: &mut Rng) -> String {
    let token = |rng: &mut Rng, n: usize| -> String {
        let chars = b"ABCXYZabcxyz0189";
        (0..n).map(|_| char::from(*rng.pick(chars))).collect()
    };
    match rng.below(6) {
        0 => format!(
            "{} {}",
            rng.pick(&["Bearer", "bearer", "BEARER"]),
            token(rng, 20)
        ),
        1 => format!("{}-{}", rng.pick(&["sk", "pk", "rk"]), token(rng, 20)),
        2 => format!(
            "gh{}_{}",
            rng.pick(&["p", "o", "u", "s", "r"]),
            token(rng, 36)
        ),
        3 => format!("AKIA{}", rng.letters(16)),
        4 => format!("xox{}-{}", rng.pick(&["a", "b", "p", "r"]), token(rng, 12)),
        _ => format!(
            "eyJ{}.eyJ{}.{}",
            token(rng, 8),
            token(rng, 8),
            token(rng, 8)
        ),
    }
}

/// Look-alikes that a detector must leave alone on their own.
fn look_alike(rng: &mut Rng, kind: EntityKind) -> String {
    match kind {
        EntityKind::Card => {
            // The last digit changed: fails Luhn.
            let mut c = card(rng);
            let last = c.pop().expect("digits");
            c.push(char::from(
                b'0' + (last as u8 - b'0' + 1 + rng.below(9) as u8) % 10,
            ));
            c
        }
        EntityKind::Iban => {
            // Wrong check digits.
            let i = iban(rng).replace(' ', "");
            let check: u32 = i[2..4].parse().expect("digits");
            format!(
                "{}{:02}{}",
                &i[..2],
                (check + 1 + rng.below(95) as u32) % 100,
                &i[4..]
            )
        }
        EntityKind::UsSsn => match rng.below(5) {
            0 => format!("000-{}-{}", 10 + rng.below(90), 1000 + rng.below(9000)),
            1 => format!("666-{}-{}", 10 + rng.below(90), 1000 + rng.below(9000)),
            2 => format!(
                "9{}-{}-{}",
                rng.digits(2),
                10 + rng.below(90),
                1000 + rng.below(9000)
            ),
            3 => format!("{}-00-{}", 100 + rng.below(800), 1000 + rng.below(9000)),
            _ => format!("{}-{}-0000", 100 + rng.below(800), 10 + rng.below(90)),
        },
        EntityKind::Email => rng
            .pick(&["foo@bar", "user@localhost", "@handle", "a@b.c", "x@1.23"])
            .to_string(),
        _ => match rng.below(8) {
            0 => format!("2026-{:02}-{:02}", 1 + rng.below(12), 1 + rng.below(28)),
            1 => "5f0c6e2a-1b7d-4c39-9a8e-2d4b6f1a0c93".to_string(),
            2 => format!(
                "10.{}.{}.{}",
                rng.below(256),
                rng.below(256),
                rng.below(256)
            ),
            3 => format!("v{}.{}.{}", rng.below(10), rng.below(30), rng.below(100)),
            4 => format!("order #{}", rng.digits(9)),
            5 => format!("EUR 1,{}.{}", rng.digits(3), rng.digits(2)),
            6 => format!(
                "{:02}:{:02}:{:02}",
                rng.below(24),
                rng.below(60),
                rng.below(60)
            ),
            _ => "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                .to_string(),
        },
    }
}

fn corpus_masker() -> Masker {
    // Tokens hold no structure characters, so any change of structure is masking's.
    let detectors = DetectorRule::every_kind(Method::Token, false);
    Masker::new(
        MaskingConfig {
            columns: vec![],
            detectors,
        },
        b"corpus".to_vec(),
    )
}

#[test]
fn recall_and_look_alikes_on_a_generated_corpus() {
    let masker = corpus_masker();
    let mut rng = Rng(0x5eed_0010);
    let generators: [(EntityKind, Generator, f64); 5] = [
        (EntityKind::Email, email, 0.999),
        (EntityKind::Card, card, 0.999),
        (EntityKind::Iban, iban, 0.999),
        (EntityKind::UsSsn, ssn, 0.999),
        (EntityKind::Phone, phone, 0.9),
    ];
    eprintln!("kind      recall     look-alikes masked");
    for (kind, generate, goal) in generators {
        let (mut found, mut false_positives) = (0, 0);
        let mut misses = Vec::new();
        for _ in 0..SAMPLES {
            let value = generate(&mut rng);
            let around = *rng.pick(SURROUNDINGS);
            let text = around.replace("{}", &value);
            let out = masker.mask(&text, None, false, None);
            let missed = out.contains(&value);
            // A value left in clear keeps its own structure characters (`(415) 555-2671`).
            let kept = if missed { structure(&value) } else { 0 };
            assert_eq!(
                structure(&out),
                structure(&around.replace("{}", "")) + kept,
                "masking changed the structure: {text:?} -> {out:?}"
            );
            if missed {
                misses.push(text);
            } else {
                found += 1;
            }
            let look_alike = around.replace("{}", &look_alike(&mut rng, kind));
            if masker.mask(&look_alike, None, false, None) != look_alike {
                false_positives += 1;
            }
        }
        let recall = found as f64 / SAMPLES as f64;
        let fp = false_positives as f64 / SAMPLES as f64;
        eprintln!(
            "{:<9} {:>7.3}%   {:>6.2}%",
            kind.label(),
            recall * 100.0,
            fp * 100.0
        );
        assert!(
            recall >= goal,
            "{}: recall {recall} below {goal}; missed e.g. {:?}",
            kind.label(),
            &misses[..misses.len().min(5)]
        );
        // Look-alikes are masked only where the surroundings add digits that pass a check
        // (`ref 42 ` before a number failing Luhn, the digit groups of an IBAN with wrong check
        // digits read as a card): a few percent at most.
        assert!(fp <= 0.05, "{}: look-alikes masked {fp}", kind.label());
    }
}

#[test]
fn values_without_personal_data_are_left_alone() {
    let masker = corpus_masker();
    let mut rng = Rng(0x5eed_0011);
    for _ in 0..SAMPLES {
        let around = *rng.pick(SURROUNDINGS);
        let text = around.replace("{}", &look_alike(&mut rng, EntityKind::Secret));
        assert_eq!(masker.mask(&text, None, false, None), text);
    }
}

/// `hinted` never leaves out a kind whose pattern matches (so skipping that kind's regex never
/// skips a find): over the corpus's entities and look-alikes in their surroundings, and over
/// random mixes of the hints' pieces, near misses, separators and non-ASCII characters
/// (the Kelvin sign and the long s among them, which fold to ASCII letters).
#[test]
fn hints_never_miss_a_pattern_match() {
    // Separated by `|`.
    const PIECES: &str =
        "0|4|9|12|123|555|2671|415.555.2671|4111|-|.| |  |+|(|)|@|_|=|A|B|J|K|Z|GB|DE89|\
        a|b|e|g|h|k|o|p|r|x|y|ey|bear|bearer|BEARER|bEaReR|Bearer abcdefghijklmnop|sk|sk-|pk-|rk-|\
        gh|ghp_|gho_|ghu_|ghs_|ghr_|ghx_|xox|xoxa-|xoxb-|xoxp-|xoxr-|xoxz-|AKI|AKIA|eyJ|\
        eyJhbGci.eyJzdWIi.c2ln|abcdefghijklmnopqrstuvwxyz|ABCDEFGHIJKLMNOP|0123456789|é|ß|\
        \u{212a}|\u{17f}|用户|\u{a0}|\u{2003}|٣|\n|\t|.com|x.y";
    let pieces: Vec<&str> = PIECES.split('|').collect();
    let mut rng = Rng(0x5eed_0012);
    let generators: [Generator; 6] = [email, card, iban, ssn, phone, secret];
    let mut matched = BTreeMap::<EntityKind, usize>::new();
    for n in 0..SAMPLES * 2 {
        let text = match n % 3 {
            0 => rng
                .pick(SURROUNDINGS)
                .replace("{}", &rng.pick(&generators)(&mut rng)),
            1 => {
                let kind = *rng.pick(&EntityKind::DETECTED);
                rng.pick(SURROUNDINGS)
                    .replace("{}", &look_alike(&mut rng, kind))
            }
            _ => (0..1 + rng.below(40)).map(|_| *rng.pick(&pieces)).collect(),
        };
        let kinds = hinted(&text);
        for det in detectors() {
            if det.re.is_match(&text) {
                *matched.entry(det.kind).or_default() += 1;
                assert!(
                    kinds.contains(det.kind),
                    "{} matches {text:?} without its hint",
                    det.kind.label()
                );
            }
        }
    }
    // Every pattern was put to the test, the secret's too.
    for kind in EntityKind::DETECTED {
        assert!(matched.get(&kind) > Some(&100), "{matched:?}");
    }
}
