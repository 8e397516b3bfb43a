"""Which sub-questions ask what the image shows (the image-entity shortcut's trigger)."""

from __future__ import annotations

import pytest

from kbrouter.reading.images import asks_what_image_shows


@pytest.mark.parametrize(
    "text",
    [
        "Which country's flag is shown in the image?",
        "Which monument is shown in this image?",
        "What animal is this?",
        "What is in the picture?",
        "What does the image show?",
        "Which planet is pictured?",
    ],
)
def test_identification_questions(text: str):
    assert asks_what_image_shows(text)


@pytest.mark.parametrize(
    "text",
    [
        "What is the monument in this image famous for?",
        "How tall is the tower shown?",
        "In which city is the national capital of the country whose flag is shown?",
        "What is the capital of Australia?",
        "",
    ],
)
def test_questions_about_the_item_are_not_identification(text: str):
    assert not asks_what_image_shows(text)
