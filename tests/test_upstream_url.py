"""A model's upstream URL is parsed once, and is the URL the endpoint string names."""

from yarl import URL

from gateway.upstream import upstream_url


def test_upstream_urls_join_the_base_and_the_endpoint_path_and_are_parsed_once():
    url = upstream_url("http://10.0.0.7:8000/v1/", "chat")
    assert url == URL("http://10.0.0.7:8000/v1/chat/completions")
    assert upstream_url("http://10.0.0.7:8000/v1/", "chat") is url
    assert str(upstream_url("https://h.example/openai/deployments/x%2Fy", "embeddings")) == \
        "https://h.example/openai/deployments/x%2Fy/embeddings"
    assert upstream_url("http://h/v1", "completions").path == "/v1/completions"


def test_the_endpoint_path_goes_before_a_query_the_base_url_has():
    """Azure's deployment URL carries `?api-version=...`: the path is joined before it (it used to be appended to
    the query, so every call went to the deployment's bare path: 502 upstream_not_found); a fragment is dropped."""
    url = upstream_url("https://res.openai.azure.com/openai/deployments/gpt4o?api-version=2024-10-21", "chat")
    assert (url.path, url.query_string) == ("/openai/deployments/gpt4o/chat/completions", "api-version=2024-10-21")
    assert str(upstream_url("http://10.0.0.7:8000/v1/#part", "embeddings")) == "http://10.0.0.7:8000/v1/embeddings"
