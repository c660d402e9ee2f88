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
