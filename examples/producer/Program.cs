// The producer of the article's pair: returns the items the consumer asks for.
var builder = WebApplication.CreateBuilder(args);
var app = builder.Build();

app.MapGet("/api/items", () => new[]
{
    new { Id = 1, Name = "Keyboard" },
    new { Id = 2, Name = "Mouse" },
});

app.Run();
