"""Errors the CLI turns into one-line messages."""


class SearchFailed(Exception):
    def __init__(self, search_id: str, reason: str):
        super().__init__(f"search {search_id} failed: {reason}")
        self.search_id = search_id
        self.reason = reason
