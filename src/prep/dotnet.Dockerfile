# Production image: build with the SDK, run on the ASP.NET runtime.
FROM mcr.microsoft.com/dotnet/sdk:8.0 AS build
WORKDIR /src
COPY . .
RUN ["dotnet", "publish", {{project_json}}, "-c", "Release", "-o", "/app/publish"]

FROM mcr.microsoft.com/dotnet/aspnet:8.0
WORKDIR /app
COPY --from=build /app/publish .
ENV ASPNETCORE_HTTP_PORTS={{port}}
EXPOSE {{port}}
ENTRYPOINT ["dotnet", {{assembly_dll_json}}]
