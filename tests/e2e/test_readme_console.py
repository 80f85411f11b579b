"""The walkthrough's checker holds outputs to the README: what it lets vary and what it does not."""

from __future__ import annotations

from readme_console import Values, section, steps

ID_A = "01m8t3s5m65ajfyhjx5abb0ck3"
ID_B = "01m8t4aaaaaaaaaaaaaaaaaaaa"
LINK_A = f"http://127.0.0.1:8080/v1/files/default/{ID_A}/{ID_A}-1.png?expires=17&sig=ab12"
README = f"""# x

## After the demo

```console
$ sdfleet submit --prompt 'a cat' \\
    --wait
submitted {ID_A}
…
{ID_A}: succeeded · …
  {LINK_A}
$ curl -s -o cat.png '{LINK_A}'
$ python - <<'EOF'
print("hi")
EOF
hi
$ sdfleet up > fleet.log 2>&1 &
```

## Next
"""


def test_steps_of_a_section() -> None:
    walk = steps(section(README, "After the demo"))
    assert [s.command.splitlines()[0] for s in walk] == [
        "sdfleet submit --prompt 'a cat' \\",
        f"curl -s -o cat.png '{LINK_A}'",
        "python - <<'EOF'",
        "sdfleet up > fleet.log 2>&1",
    ]
    assert walk[2].command.endswith("\nEOF") and walk[2].shown == ["hi"]
    assert [s.background for s in walk] == [False, False, False, True]


def test_ids_and_links_are_captured_and_carried_into_later_commands() -> None:
    walk, values = steps(section(README, "After the demo")), Values()
    link_b = LINK_A.replace(ID_A, ID_B).replace("sig=ab12", "sig=ff00").replace("=17", "=99")
    printed = [f"submitted {ID_B}", f"{ID_B} queued", f"{ID_B} running", f"{ID_B}: succeeded · queue q"]
    assert values.match(walk[0].shown, [*printed, f"  {link_b}"])
    assert values.apply(walk[1].command) == f"curl -s -o cat.png '{link_b}'"


def test_what_must_not_vary_is_held() -> None:
    walk = steps(section(README, "After the demo"))
    other = "01m8t4bbbbbbbbbbbbbbbbbbbb"
    wrong = [
        [f"submitted {ID_B}", f"{other}: succeeded · queue q", f"  {LINK_A}"],  # a different task
        [f"submitted {ID_B}", f"{ID_B}: failed · queue q", f"  {LINK_A}"],  # another state
        [f"submitted {ID_B}", f"{ID_B}: succeeded · queue q"],  # the link line missing
        [f"submitted {ID_B}", f"{ID_B}: succeeded · queue q", f"  {LINK_A}", "extra"],  # more after it
        [f"submitted {ID_B}", f"{ID_B}: succeeded · queue q", "  http://127.0.0.1:8080/v1/files/x.png?"],
    ]
    for printed in wrong:
        assert not Values().match(walk[0].shown, printed), printed
    assert not Values().match(walk[2].shown, ["hello"])
