"""The convention matrix from mutation outcomes and verdicts."""

from equivcheck.report.conventions import convention_of, matrix


def _case(verdict="pass", mutations=(), diagnosis=None, source="keras:dense", target="torch:conv", backends=("numpy", "numpy")):
    case = {
        "source": {"kind": "dense", "name": source}, "target": {"kind": "conv", "name": target},
        "source_backend": backends[0], "target_backend": backends[1], "dtype": "float32", "verdict": verdict,
        "mutations": [{"name": n, "description": "", "outcome": o, "max_error_ratio": None} for n, o in mutations],
    }
    if diagnosis:
        case["diagnosis"] = {"mutant": diagnosis, "convention": convention_of(diagnosis), "description": ""}
    return case


def _states(cases):
    return {r["conversion"]: {c: v["state"] for c, v in r["cells"].items()} for r in matrix(cases)["rows"]}


def test_mutation_names_map_to_conventions():
    assert [convention_of(n) for n in ("missing flip", "flip H only", "wrong flatten order", "dense kernel not transposed",
                                       "reshape only", "kernel axes permuted", "channels permuted", "bias dropped")] == [
        "flip", "flip", "flatten order", "kernel transposed", "kernel transposed", "kernel axes", "channels",
        "bias dropped"]


def test_a_mutation_names_its_convention_itself_in_new_reports():
    assert convention_of({"name": "some new mistake", "convention": "padding"}) == "padding"
    assert convention_of({"name": "channels permuted"}) == "channels"  # a report written before conventions were named


def test_rejected_holds_ambiguous_and_unrejected_are_ambiguous_unchecked_is_na():
    cells = _states([_case("inconclusive", [("spurious flip", "rejected"), ("flip H only", "ambiguous"),
                                            ("wrong flatten order", "not rejected"), ("channels permuted", "rejected")])])
    assert cells["keras:dense → torch:conv"] == {
        "flip": "ambiguous", "flatten order": "ambiguous", "kernel transposed": "n/a", "kernel axes": "n/a",
        "channels": "holds", "channel order": "n/a", "padding": "n/a", "bias": "n/a"}


def test_an_undiagnosed_failure_fails_every_checked_convention_a_diagnosed_one_only_its_own():
    muts = [("missing flip", "rejected"), ("wrong flatten order", "rejected")]
    plain = _states([_case("fail", muts)])["keras:dense → torch:conv"]
    assert plain["flip"] == plain["flatten order"] == "fails" and plain["channels"] == "n/a"
    blamed = _states([_case("fail", muts, diagnosis="missing flip")])["keras:dense → torch:conv"]
    assert blamed["flip"] == "fails" and blamed["flatten order"] == "holds"


def test_cases_of_one_conversion_combine_fails_over_holds_over_ambiguous():
    cases = [
        _case("pass", [("missing flip", "ambiguous"), ("wrong flatten order", "rejected")]),
        _case("pass", [("missing flip", "rejected"), ("wrong flatten order", "rejected")], backends=("numpy", "torch")),
        _case("fail", [("missing flip", "rejected"), ("wrong flatten order", "rejected")], diagnosis="wrong flatten order",
              backends=("numpy", "keras")),
        _case("pass", [("missing flip", "rejected")], source="torch:conv", target="keras:conv"),
    ]
    result = matrix(cases)
    rows = {r["conversion"]: r for r in result["rows"]}
    assert list(rows) == ["keras:dense → torch:conv", "torch:conv → keras:conv"]
    first = rows["keras:dense → torch:conv"]
    assert first["verdict"] == "fail" and first["cases"] == 3 and first["counts"] == {"pass": 2, "fail": 1}
    assert first["cells"]["flip"]["state"] == "holds"
    assert first["cells"]["flatten order"]["state"] == "fails" and "numpy→keras" in first["cells"]["flatten order"]["detail"]
    assert rows["torch:conv → keras:conv"]["cells"]["flatten order"]["state"] == "n/a"
