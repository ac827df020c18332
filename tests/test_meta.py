from dataclasses import fields

from gateway.meta import RequestMeta


def test_every_field_survives_a_round_trip_through_json() -> None:
    meta = RequestMeta(**{f.name: f"v-{f.name}" for f in fields(RequestMeta)})
    assert RequestMeta.from_json(meta.to_json()) == meta


def test_fields_left_out_are_not_written() -> None:
    assert RequestMeta(prompt="a cat").to_json() == '{"prompt": "a cat"}'
