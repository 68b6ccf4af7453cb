from services.jobs import URL_SAFE, is_job_id, new_job_id


def test_job_ids_never_start_with_a_dash_so_the_cli_takes_them_as_ids():
    ids = [new_job_id() for _ in range(3000)]
    # With any URL-safe first character, 3,000 ids would hold about 47 that
    # start with "-": `tokencast watch -Xy…` would stop with a usage error.
    assert [job_id for job_id in ids if job_id.startswith("-")] == []
    assert all(is_job_id(job_id) for job_id in ids)
    assert len(set(ids)) == 3000
    assert set("".join(ids)) == set(URL_SAFE)  # dashes still appear after the first
