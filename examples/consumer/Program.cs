// The consumer of the article's pair: calls the producer at the URL bound from configuration.
// `urls:producer` comes from the environment variable `urls__producer`, which devloop delivers
// through a Secret from the `secrets:` tree of values.dev.yaml.
var builder = WebApplication.CreateBuilder(args);
builder.Services.AddHttpClient();
var app = builder.Build();

app.MapGet("/api/demo", async (IConfiguration config, IHttpClientFactory http) =>
{
    var producer = config["urls:producer"] ?? throw new InvalidOperationException("urls:producer is not set");
    var items = await http.CreateClient().GetStringAsync($"{producer}/api/items");
    return Results.Content(items, "application/json");
});

app.Run();
